"""TMA tensor descriptors vs pointer loads for the attention K/V tiles (offline sm_90a).

``python -m benchmarks.offline.tma_experiment`` (no GPU needed). Tries
``tl.make_tensor_descriptor`` for the K/V loads, worth keeping only if the compile report
shows fewer instructions per iteration and no spills. Result: benchmarks/results/tma-experiment.md.

The same flash-forward inner loop (unmasked tiles, online softmax, 128x64 tiles, 8 warps,
3 stages, bf16, D=128), once with pointer loads of K/V (what the kernels do) and once with
tl.make_tensor_descriptor loads; compiled with the repo's offline tooling."""
from benchmarks.offline import rerun_without_interpreter

if __name__ == "__main__":  # the kernels below must be real @triton.jit functions
    rerun_without_interpreter("benchmarks.offline.tma_experiment")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks.offline.offline_compile import Launch, analyse, compile_launch  # noqa: E402


@triton.jit
def fwd_ptr(Q, K, V, O, stride_t, T, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_m = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * T * stride_t
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + o_m[:, None] * stride_t + o_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    o_2d = o_n[:, None] * stride_t + o_d[None, :]
    for start_n in range(0, T, BLOCK_N):
        off = base + start_n.to(tl.int64) * stride_t
        k = tl.load(K + off + o_2d)
        v = tl.load(V + off + o_2d)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    tl.store(O + base + o_m[:, None] * stride_t + o_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


@triton.jit
def fwd_desc(Q, K, V, O, stride_t, T, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    i_m = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * T * stride_t
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + base + o_m[:, None] * stride_t + o_d[None, :])
    k_desc = tl.make_tensor_descriptor(K + base, shape=[T, HEAD_DIM], strides=[stride_t, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + base, shape=[T, HEAD_DIM], strides=[stride_t, 1],
                                       block_shape=[BLOCK_N, HEAD_DIM])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, T, BLOCK_N):
        k = k_desc.load([start_n, 0])
        v = v_desc.load([start_n, 0])
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    tl.store(O + base + o_m[:, None] * stride_t + o_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


def meta_t():
    return torch.empty(16, dtype=torch.bfloat16)


def main() -> None:
    for fn in (fwd_ptr, fwd_desc):
        for bm, bn, w, st in ((128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3)):
            launch = Launch(fn, (meta_t(), meta_t(), meta_t(), meta_t(), 128 * 32, 32768, 0.1),
                            dict(HEAD_DIM=128, BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st))
            try:
                r = analyse(compile_launch(launch))
                print(f"{fn.__name__:9s} {bm}x{bn} w{w} s{st}: regs {r['regs']} spill {r['spill_bytes']} "
                      f"smem {r['smem_bytes']} tma {r['tma_loads']} cp.async {r['cp_async_loads']} "
                      f"instr/it {r['instrs_per_iter']} issue {r['issue_cycles_per_iter']} tensor {r['tensor_cycles_per_iter']}",
                      flush=True)
            except Exception as e:
                print(fn.__name__, bm, bn, "ERROR", repr(e)[:400], flush=True)


if __name__ == "__main__":
    main()
