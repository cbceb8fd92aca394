"""Per-rank activation memory that ``swa_attention_cp`` keeps for the backward, and the rows
its kernels run, measured on gloo (CPU) with ``torch.autograd.graph.saved_tensors_hooks``.

``python -m benchmarks.cp_memory [--module PATH] [--backend torch|triton] [--world N]``

Every rank runs the op's forward on its shard under a saved-tensor hook and sums the bytes of
the distinct storages the autograd graph keeps (a view keeps its whole storage alive), once
with ``summaries=True`` and once without: the difference is the memory kept for the
summaries. With ``backend="triton"`` (``TRITON_INTERPRET=1`` on a CPU) the query rows of every
forward kernel launch are logged too: ``padded rows = launched rows - T_local``.
``--module PATH`` loads another context-parallel module (e.g. an older commit's, from ``git show
<commit>:dasg_kernels/context_parallel.py > /tmp/old.py``) in place of the package's, for a
before/after comparison at the same shapes.

Also the bytes each rank sends in one forward + backward (``cp_comm_stats``). Prints one JSON
line per (shape, rank).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os

import torch
import torch.distributed as dist

# (T_local, G, left): n_groups of the last rank grows as T_local / G
SHAPES = [(64, 4, 8), (128, 4, 8), (128, 8, 8), (128, 16, 8), (256, 8, 8)]


def _load(path: str | None):
    if path is None:
        from dasg_kernels import context_parallel

        return context_parallel
    spec = importlib.util.spec_from_file_location("cp_distributed_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def summary_bytes_after(world: int, rank: int, t_local: int, left: int, group_size: int, *, layout: str,
                        batch: int, row_elems: int, elem_bytes: int) -> int:
    """Bytes the summaries keep for the backward on ``rank`` (this module's model of the
    current code, checked against the hook in :func:`main`): per chunk of the rank its means
    ``[n_groups, B, F]`` in the input dtype and their int32 group index, and per own chunk
    that contributes ``m`` group slots the int32 slot index of the positions in them."""
    from dasg_kernels.context_parallel import CPGeometry, cp_exchange_plan

    geo = CPGeometry(world, t_local, left, group_size, layout == "zigzag")
    total = 0
    for c in geo.chunks(rank):
        n = geo.n_groups(c)
        total += n * batch * row_elems * elem_bytes + 4 * n
    for c, m in cp_exchange_plan(geo, rank)[3].items():
        if m:
            start = geo.start(c)
            total += 4 * min(geo.tc, (start // group_size + m) * group_size - start)
    return total


def summary_bytes_before(world: int, rank: int, t_local: int, left: int, group_size: int, *, batch: int,
                         heads_q: int) -> int:
    """The largest term the summaries kept before (commit 3720ffb's Triton path): the fp32
    summary probabilities ``[B, Hq, T_local, n_groups]`` (the measured rest is ``O(T_local)``)."""
    n = max(0, (rank * t_local + t_local - 1 - left) // group_size)
    return batch * heads_q * t_local * n * 4


def _saved_bytes(fn) -> tuple[int, list]:
    """Run ``fn()`` under a saved-tensor hook: ``(bytes of the distinct storages, shapes)``."""
    seen: dict[int, int] = {}
    shapes: list = []

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen[st.data_ptr()] = st.nbytes()
            shapes.append((tuple(t.shape), str(t.dtype).replace("torch.", ""), st.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()), shapes


def _worker(rank: int, world: int, port: int, path: str | None, backend: str, b: int, hq: int, hkv: int,
            d: int, out_path: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mod = _load(path)
    from dasg_kernels.attention import fwd as fwd_mod

    launched: list[int] = []
    real = fwd_mod.swa_fwd

    def logged(q, *args, **kwargs):
        launched.append(q.shape[1])
        return real(q, *args, **kwargs)

    fwd_mod.swa_fwd = logged
    lines = []
    try:
        for tl, g, left in SHAPES:
            gen = torch.Generator().manual_seed(rank)
            q = torch.randn(b, tl, hq, d, generator=gen, requires_grad=True)
            k = torch.randn(b, tl, hkv, d, generator=gen, requires_grad=True)
            v = torch.randn(b, tl, hkv, d, generator=gen, requires_grad=True)
            res = {}
            for summ in (True, False):
                launched.clear()
                kw = dict(group=dist.group.WORLD, window=(left, 0), group_size=g, summaries=summ, backend=backend)
                nbytes, shapes = _saved_bytes(lambda: mod.swa_attention_cp(q, k, v, **kw))
                res[summ] = (nbytes, shapes, list(launched))
            mod.cp_comm_stats(reset=True)  # bytes of one forward + backward with summaries
            kw = dict(group=dist.group.WORLD, window=(left, 0), group_size=g, summaries=True, backend=backend)
            mod.swa_attention_cp(q, k, v, **kw).sum().backward()
            sent = mod.cp_comm_stats(reset=True)
            n_groups = max(0, (rank * tl + tl - 1 - left) // g)
            model = None
            if path is None:
                model = summary_bytes_after(world, rank, tl, left, g, layout="contiguous", batch=b,
                                            row_elems=hkv * 2 * d, elem_bytes=4)
            lines.append(json.dumps({
                "backend": backend, "world": world, "rank": rank, "T_local": tl, "G": g, "left": left,
                "n_groups": n_groups, "saved_bytes": res[True][0], "saved_bytes_no_summaries": res[False][0],
                "summary_bytes": res[True][0] - res[False][0], "summary_bytes_model": model,
                "launched_rows": res[True][2], "bytes_sent": sent,
                "padded_rows": [n - tl for n in res[True][2]], "saved": res[True][1]}))
    finally:
        fwd_mod.swa_fwd = real
        dist.destroy_process_group()
    with open(f"{out_path}.{rank}", "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--module", default=None, help="path of a context_parallel.py to load instead of the package's")
    p.add_argument("--backend", default="torch", choices=("torch", "triton"))
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, nargs=2, default=(4, 2), metavar=("HQ", "HKV"))
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--extrapolate", action="store_true",
                   help="print the models at T=128k, CP=8, W=2048, G=256, Hq=64, Hkv=8, D=128, bf16 instead")
    a = p.parse_args(argv)
    if a.extrapolate:
        for layout in ("contiguous", "zigzag"):
            for r in range(8):
                after = summary_bytes_after(8, r, 16384, 2048, 256, layout=layout, batch=1, row_elems=8 * 256,
                                            elem_bytes=2)
                before = summary_bytes_before(8, r, 16384, 2048, 256, batch=1, heads_q=64)
                print(json.dumps({"layout": layout, "rank": r, "summary_bytes_after": after,
                                  "summary_bytes_before_p2": before}))
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tempfile.mkdtemp(), "cp_memory")
    path = os.path.abspath(a.module) if a.module else None
    mp.start_processes(_worker, args=(a.world, port, path, a.backend, a.batch, a.heads[0], a.heads[1], a.head_dim,
                                      out), nprocs=a.world, start_method="fork")
    for r in range(a.world):
        with open(f"{out}.{r}") as f:
            print(f.read(), end="")


if __name__ == "__main__":
    main()
