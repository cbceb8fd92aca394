"""``python -m benchmarks.bench_configs``: time two first configs per attention kernel on a GPU.

The compile report (:mod:`benchmarks.offline.compile_report`) *predicts* that each attention
kernel's current first config (``new``) beats the one before it (``old``); this measures it. For each
changed kernel (forward, dq, dk/dv; bf16, D=128, B=1 T=32k Hq=32 Hkv=8 left=2047 G=256
summaries) it pins one config at a time (``DASG_AUTOTUNE=0`` keeps the first entry of
the space) and times the public op with ``triton.testing.do_bench``. It also times the
MoE expert FFN forward and forward+backward at the Mixtral shape, whose change (grid
order, h reused in the weight gradient) is code, not a config, to set the measured
TFLOP/s beside the report's prediction. CUDA only; writes ``<out>/bench-configs.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["DASG_AUTOTUNE"] = "0"

import torch  # noqa: E402

#: (space, head-dim class, old first config, new first config) as (BM, BN, warps, stages)
CHANGES = (
    ("fwd", 128, (128, 32, 8, 3), (128, 64, 8, 3)),
    ("dq", 128, (64, 32, 8, 3), (128, 32, 8, 2)),
    ("dkdv", 128, (32, 64, 8, 2), (32, 128, 8, 2)),
)


def _pin(space_name: str, cls: int, cfg: tuple[int, int, int, int]) -> None:
    """Make ``cfg`` the first config of its space and forget every tuned choice."""
    import triton

    from dasg_kernels.attention import bwd, configs, fwd

    space = configs.SPACES[space_name]
    space[:] = [(configs._cfg(*cfg), cls)] + [s for s in space if s[1] != cls or s[0].kwargs != {
        "BLOCK_M": cfg[0], "BLOCK_N": cfg[1]}]
    for k in (fwd._swa_fwd_kernel, bwd._swa_bwd_dq_kernel, bwd._swa_bwd_dkdv_kernel):
        if isinstance(k, triton.runtime.Autotuner):
            k.cache.clear()


def time_attention(t: int = 32768) -> list[dict]:
    import triton

    import dasg_kernels as dk

    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1, t, 32, 128, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(1, t, 8, 128, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(1, t, 8, 128, device=dev, dtype=dt, requires_grad=True)
    kw = dict(window=(2047, 0), causal=True, group_size=256, summaries=True)
    out = []
    for name, cls, old, new in CHANGES:
        for tag, cfg in (("old", old), ("new", new)):
            _pin(name, cls, cfg)
            o = dk.swa_attention(q, k, v, **kw)
            do = torch.randn_like(o)
            if name == "fwd":
                ms = triton.testing.do_bench(lambda: dk.swa_attention(q, k, v, **kw))
            else:  # the whole backward (the other kernels keep their configs)
                ms = triton.testing.do_bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
            out.append({"kernel": name, "which": tag, "config": "%dx%d w%d s%d" % cfg, "ms": ms})
            print(out[-1], flush=True)
    return out


def time_moe(n: int = 16384, d: int = 4096, f: int = 14336, e: int = 8, k: int = 2) -> list[dict]:
    import triton

    import dasg_kernels as dk

    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)
    w1 = (torch.randn(e, 2 * f, d, device=dev, dtype=dt) * d ** -0.5).requires_grad_()
    w2 = (torch.randn(e, d, f, device=dev, dtype=dt) * f ** -0.5).requires_grad_()
    routing = dk.route(torch.randn(n, e, device=dev), top_p=1.0, k_max=k)
    flops = 2 * n * k * d * 3 * f
    fwd = triton.testing.do_bench(lambda: dk.expert_ffn(x, w1, w2, routing))
    y = dk.expert_ffn(x, w1, w2, routing)
    dy = torch.randn_like(y)
    bwd = triton.testing.do_bench(lambda: torch.autograd.grad(y, (x, w1, w2), dy, retain_graph=True))
    out = [{"kernel": "moe_expert_ffn", "which": "fwd", "ms": fwd, "tflops": flops / fwd / 1e9},
           {"kernel": "moe_expert_ffn", "which": "bwd", "ms": bwd, "tflops": 2 * flops / bwd / 1e9}]
    for r in out:
        print(r, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_configs: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = {"device": torch.cuda.get_device_name(), "attention": time_attention(), "moe": time_moe()}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench-configs.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
