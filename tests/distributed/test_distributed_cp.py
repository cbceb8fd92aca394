"""Context parallelism on gloo/CPU: ``swa_attention_cp`` and ``apply_context_parallel`` against one process.

Each test starts 2 or 4 processes (``torch.multiprocessing.start_processes``, forked on
Linux, spawned elsewhere; gloo over
``tcp://127.0.0.1:<free port>``, one thread each). Every rank builds the whole problem
from the same seed, computes the single-process result itself (the fp32 reference
``reference.swa_attention_ref``, the oracle ``swa_attention`` is tested against, or the
unsharded model) and compares its shard of the output and of the gradients; an assertion
in any rank fails the test with that rank's traceback.

Tolerances (fp32): attention ``atol = 1.5e-6, rtol = 0`` against the fp32 reference on the
whole sequence, on both paths (the blockwise PyTorch core and the Triton kernels under the
interpreter; measured up to 1.4e-6 over these cases); the model ``atol = rtol = 1e-4``
(logits, loss, parameter gradients averaged over the CP ranks).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from _helpers import free_port, run_ranks
from torch.testing import assert_close

from dasg_kernels import reference
from dasg_kernels.backend import triton_can_run_on
from dasg_kernels.context_parallel import cp_comm_stats, cp_positions, cp_shard, swa_attention_cp
from dasg_model import DASGConfig, DASGForCausalLM
from dasg_model.parallel import apply_context_parallel, shift_labels_cp
from dasg_model.parallel.context import remove_context_parallel

# --------------------------------------------------------------------------- harness


def _worker(rank: int, world: int, port: int, fn_name: str, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        globals()[fn_name](rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn_name: str, world: int, *args) -> None:
    run_ranks(_worker, world, (world, free_port(), fn_name, args))


# --------------------------------------------------------------------------- attention


def _check_attention(rank: int, world: int, *, tl: int, left: int, g: int | None, summaries: bool,
                     hq: int = 2, hkv: int = 1, d: int = 8, dv: int | None = None, b: int = 2,
                     backend: str = "torch", layout: str = "contiguous", tol: float = 1.5e-6, seed: int = 0,
                     dtype: torch.dtype = torch.float32, group=None) -> None:
    """``rank``, ``world``: this process's place in ``group`` (default: the whole world). With a
    16-bit ``dtype`` the sharded op gets the inputs rounded to it, the reference their fp32
    values, and ``tol`` is also the relative tolerance."""
    group = dist.group.WORLD if group is None else group
    dv = d if dv is None else dv
    gen = torch.Generator().manual_seed(seed)
    t = world * tl
    q = torch.randn(b, t, hq, d, generator=gen)
    k = torch.randn(b, t, hkv, d, generator=gen)
    v = torch.randn(b, t, hkv, dv, generator=gen)
    dout = torch.randn(b, t, hq, dv, generator=gen)
    kw = dict(window=(left, 0), causal=True, group_size=g, summaries=summaries)

    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    ref, _ = reference.swa_attention_ref(qf, kf, vf, **kw)
    (ref * dout).sum().backward()

    def shard(x):
        return cp_shard(x, group=group, layout=layout)

    ql, kl, vl = (shard(x).to(dtype).requires_grad_() for x in (q, k, v))
    if dtype != torch.float32:
        qf, kf, vf = (x.to(dtype).float().requires_grad_() for x in (q, k, v))
        ref, _ = reference.swa_attention_ref(qf, kf, vf, **kw)
        (ref * dout).sum().backward()
    cp_comm_stats(reset=True)
    out = swa_attention_cp(ql, kl, vl, group=group, backend=backend, layout=layout, **kw)
    assert out.dtype == dtype
    (out.float() * shard(dout)).sum().backward()
    _check_bytes(cp_comm_stats(reset=True), rank, world, tl=tl, left=left, g=g if summaries else None,
                 layout=layout, row_bytes=b * hkv * (d + dv) * ql.element_size())

    t_ = dict(atol=tol, rtol=0 if dtype == torch.float32 else tol)
    assert_close(out.float(), shard(ref).detach(), **t_, msg=lambda m: f"out: {m}")
    assert_close(ql.grad.float(), shard(qf.grad), **t_, msg=lambda m: f"dq: {m}")
    assert_close(kl.grad.float(), shard(kf.grad), **t_, msg=lambda m: f"dk: {m}")
    assert_close(vl.grad.float(), shard(vf.grad), **t_, msg=lambda m: f"dv: {m}")


def _chunks_of(rank: int, world: int, tl: int, layout: str) -> list[range]:
    """Global positions of rank ``rank``'s chunks (worked out here, not by the module)."""
    if layout == "contiguous":
        return [range(rank * tl, (rank + 1) * tl)]
    tc = tl // 2
    return [range(c * tc, (c + 1) * tc) for c in (rank, 2 * world - 1 - rank)]


def _check_bytes(sent: dict, rank: int, world: int, *, tl, left, g, layout, row_bytes) -> None:
    """The counted bytes against the exchange's geometry, from position sets: each halo row
    a later chunk of another rank reads from this rank's chunks, once; each group
    contribution (a group this rank's chunk has positions in) that a later chunk of another
    rank reads, once; backward, the same rows of the chunks this rank received."""
    def halo(pos):  # positions before the chunk that its queries' windows reach
        return set(range(0 if left < 0 else max(0, pos.start - left), pos.start))

    def groups_read(pos):  # groups wholly before the window of some query of the chunk
        return set(range(max(0, (pos.stop - 1 - left) // g))) if g and left >= 0 else set()

    def rows(src_rank, dst_rank):
        h = s = 0
        for cs in _chunks_of(src_rank, world, tl, layout):
            for cd in _chunks_of(dst_rank, world, tl, layout):
                h += len(halo(cd) & set(cs))
                s += len(groups_read(cd) & {p // g for p in cs}) if g else 0
        return h, s

    others = [p for p in range(world) if p != rank]
    out = [rows(rank, p) for p in others]
    back = [rows(p, rank) for p in others]
    want = {"halo": sum(h for h, _ in out), "summaries": sum(s for _, s in out),
            "halo_bwd": sum(h for h, _ in back), "summaries_bwd": sum(s for _, s in back)}
    for phase, n in want.items():
        assert sent.get(phase, 0) == n * row_bytes, f"{phase} bytes {sent}: want {n} rows"
    if "validate" in sent:  # 13 int64 and their negatives, as a ring all-reduce sends
        assert sent["validate"] == 2 * (world - 1) * 26 * 8 // world, sent
    assert sent["total"] == sum(v for k, v in sent.items() if k != "total")


def _attention_cases(rank: int, world: int, cases: list[dict]) -> None:
    for case in cases:
        try:
            _check_attention(rank, world, **case)
        except AssertionError as e:
            raise AssertionError(f"world {world}, rank {rank}, case {case}: {e}") from e


# shard lengths that are not multiples of G or of the window, windows longer than a
# shard (the halo spans several ranks with 4), groups straddling or spanning shards
CASES_2 = [
    dict(tl=7, left=3, g=3, summaries=True),                    # straddling groups
    dict(tl=5, left=8, g=4, summaries=True),                    # window > shard: halo is rank 0's whole shard
    dict(tl=6, left=-1, g=None, summaries=False, hq=4, hkv=2, layout="zigzag"),  # full causal, GQA
    dict(tl=9, left=2, g=4, summaries=False),
    dict(tl=5, left=0, g=2, summaries=True),                    # no halo, summaries only
    dict(tl=7, left=3, g=3, summaries=True, backend="auto", seed=1),
    dict(tl=10, left=13, g=3, summaries=True, hq=4, hkv=2, dv=12, layout="zigzag"),  # Dv != D, window > 2 chunks
    dict(tl=8, left=1, g=5, summaries=True, layout="zigzag"),  # the middle chunks meet on rank 1
    dict(tl=7, left=3, g=3, summaries=True, dtype=torch.bfloat16, tol=3e-2),
]
CASES_4 = [
    dict(tl=5, left=11, g=3, summaries=True),                   # halo from 3 ranks
    dict(tl=3, left=2, g=8, summaries=True),                    # a group spans 3 shards
    dict(tl=4, left=6, g=None, summaries=False, hq=4, hkv=2),
    dict(tl=6, left=-1, g=4, summaries=True, layout="zigzag"),  # full window: summaries never seen
    dict(tl=7, left=4, g=3, summaries=True, hq=4, hkv=1, backend="auto", seed=2),
    dict(tl=6, left=7, g=2, summaries=True, hq=4, hkv=2, dv=16, layout="zigzag"),
    dict(tl=5, left=13, g=3, summaries=True, hq=3, hkv=1, dv=8),  # window wider than two shards, odd Hq
]


def _mismatched_collectives(rank: int, world: int) -> None:
    if rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    else:
        import time

        time.sleep(60)


def test_a_hang_fails_instead_of_blocking():
    """The harness's safety net: ranks stuck in a collective fail the test after its timeout
    (a CI run once hung here for its whole budget)."""
    with pytest.raises(pytest.fail.Exception, match="did not finish in 3 s"):
        run_ranks(_worker, 2, (2, free_port(), "_mismatched_collectives", ()), timeout=3)


def _subgroups(rank: int, world: int) -> None:
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    mine = groups[rank // 2]
    _check_attention(rank % 2, 2, tl=5, left=6, g=3, summaries=True, group=mine, seed=rank // 2)


def test_cp_attention_on_subgroups_4_ranks():
    """Two CP groups of 2 inside a world of 4 (a dp x cp mesh): the backward of the summary
    all-gather must use group ranks (torch.distributed.nn's all_gather did not on gloo)."""
    _spawn("_subgroups", 4)


def test_cp_attention_2_ranks():
    _spawn("_attention_cases", 2, CASES_2)


def test_cp_attention_4_ranks():
    _spawn("_attention_cases", 4, CASES_4)


def test_cp_attention_triton_2_ranks():
    if not triton_can_run_on(torch.device("cpu")):
        pytest.skip("backend='triton' cannot run on the CPU here (TRITON_INTERPRET unset)")
    cases = [
        dict(tl=7, left=3, g=3, summaries=True, d=32, b=1, backend="triton"),
        dict(tl=5, left=8, g=None, summaries=False, d=32, b=1, hq=2, hkv=2, backend="triton"),
        # window wider than two chunks, GQA, Dv != D, queries offset into [halo; chunk] keys
        dict(tl=10, left=13, g=3, summaries=True, d=16, dv=8, hq=4, hkv=2, b=1, layout="zigzag", backend="triton"),
        dict(tl=7, left=3, g=3, summaries=True, d=16, b=1, backend="triton", dtype=torch.bfloat16, tol=3e-2),
    ]
    _spawn("_attention_cases", 2, cases)


# --------------------------------------------------------------------------- packed documents


def _check_packed(rank: int, world: int, *, tl: int, bounds: list[int], left: int, g: int | None, summaries: bool,
                  hq: int = 2, hkv: int = 1, d: int = 8, dv: int | None = None, backend: str = "torch",
                  layout: str = "contiguous", tol: float = 1.5e-6, seed: int = 0) -> None:
    """Packed documents ``bounds`` (global offsets) over the CP ranks against the oracle run on
    each document alone (positions, window and groups from the document's start), forward and
    gradients."""
    group = dist.group.WORLD
    dv = d if dv is None else dv
    gen = torch.Generator().manual_seed(seed)
    t = world * tl
    q, k = torch.randn(1, t, hq, d, generator=gen), torch.randn(1, t, hkv, d, generator=gen)
    v, dout = torch.randn(1, t, hkv, dv, generator=gen), torch.randn(1, t, hq, dv, generator=gen)
    kw = dict(window=(left, 0), causal=True, group_size=g, summaries=summaries)
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    ref = torch.cat([reference.swa_attention_ref(qf[:, a:b], kf[:, a:b], vf[:, a:b], **kw)[0]
                     for a, b in zip(bounds, bounds[1:]) if b > a], dim=1)
    (ref * dout).sum().backward()

    def shard(x):
        return cp_shard(x, group=group, layout=layout)

    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    out = swa_attention_cp(ql, kl, vl, group=group, backend=backend, layout=layout,
                           cu_seqlens=torch.tensor(bounds, dtype=torch.int32), **kw)
    (out * shard(dout)).sum().backward()
    t_ = dict(atol=tol, rtol=0)
    assert_close(out, shard(ref).detach(), **t_, msg=lambda m: f"out: {m}")
    assert_close(ql.grad, shard(qf.grad), **t_, msg=lambda m: f"dq: {m}")
    assert_close(kl.grad, shard(kf.grad), **t_, msg=lambda m: f"dk: {m}")
    assert_close(vl.grad, shard(vf.grad), **t_, msg=lambda m: f"dv: {m}")


def _packed_cases(rank: int, world: int, cases: list[dict]) -> None:
    for case in cases:
        _check_packed(rank, world, **case)


PACKED_2 = [
    # a document across the rank boundary, a 1-token document, summaries of documents on both ranks
    dict(tl=16, bounds=[0, 5, 13, 14, 32], left=3, g=2, summaries=True),
    dict(tl=16, bounds=[0, 11, 32], left=20, g=3, summaries=True, hq=4, hkv=2, dv=4),  # window wider than a shard
    dict(tl=12, bounds=[0, 24], left=4, g=3, summaries=True, layout="zigzag"),         # one document = plain CP
    dict(tl=12, bounds=[0, 7, 7, 19, 24], left=-1, g=None, summaries=False, layout="zigzag"),  # empty document
    dict(tl=10, bounds=[0, 3, 9, 17, 20], left=2, g=4, summaries=True, layout="zigzag", seed=1),
]


def test_cp_packed_documents_2_ranks():
    _spawn("_packed_cases", 2, PACKED_2)


def test_cp_packed_documents_3_ranks_triton():
    if not triton_can_run_on(torch.device("cpu")):
        pytest.skip("backend='triton' cannot run on the CPU here (TRITON_INTERPRET unset)")
    cases = [
        dict(tl=8, bounds=[0, 6, 19, 24], left=5, g=3, summaries=True, d=16, backend="triton"),  # a document on 3 ranks
        dict(tl=8, bounds=[0, 2, 10, 24], left=3, g=2, summaries=True, d=16, hq=4, hkv=2, layout="zigzag",
             backend="triton"),
    ]
    _spawn("_packed_cases", 3, cases)


def _packed_validation(rank: int, world: int) -> None:
    x = torch.randn(1, 4, 2, 8)
    kw = dict(group=dist.group.WORLD, window=(2, 0), group_size=2, summaries=True, backend="torch")

    def expect(exc, match, xx=x, **over):
        with pytest.raises(exc, match=match):
            swa_attention_cp(xx, xx[:, :, :1], xx[:, :, :1], **{**kw, **over})

    expect(ValueError, r"end at the whole sequence's length", cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32))
    expect(ValueError, r"never decrease", cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32))
    expect(ValueError, r"int32", cu_seqlens=torch.tensor([0, 8]))
    expect(ValueError, r"batch size 1", xx=torch.randn(2, 4, 2, 8), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32))
    # different documents on the ranks: the argument check names them
    expect(ValueError, r"cu_seqlens", cu_seqlens=torch.tensor([0, 3 + rank, 8], dtype=torch.int32))
    dist.barrier()


def test_cp_packed_documents_validation_2_ranks():
    _spawn("_packed_validation", 2)


# --------------------------------------------------------------------------- validation


def _validation(rank: int, world: int) -> None:
    def expect(exc, match, **over):
        tl = over.pop("tl", 4)
        x = torch.randn(1, tl, 2, 8)
        kw = dict(group=dist.group.WORLD, window=(2, 0), group_size=2, summaries=True, backend="torch")
        kw.update(over)
        with pytest.raises(exc, match=match):
            swa_attention_cp(x, x[:, :, :1], x[:, :, :1], **kw)

    expect(ValueError, r"shard length", tl=4 + rank)  # unequal shards: every rank raises
    expect(ValueError, r"window\[0\] \(left\)", window=(2 + rank, 0))
    expect(ValueError, r"only causal", causal=False, window=(2, 2))
    expect(TypeError, r"group must be a torch.distributed ProcessGroup", group="world")
    expect(ValueError, r"summaries=True needs group_size", group_size=None)
    expect(ValueError, r"needs layout='zigzag'", window=(-1, 0), summaries=False)
    expect(ValueError, r"layout must be one of", layout="ring")
    expect(ValueError, r"zigzag' needs an even shard length", tl=5, layout="zigzag")
    # unequal shards with validate=False: every rank whose length disagrees with seq_len
    # raises before any collective (here both: 2 x 4 and 2 x 5 are not 9)
    expect(ValueError, r"shard length T_local\) = \d on rank", tl=4 + rank, seq_len=9, validate=False)
    expect(ValueError, r"softmax_scale", softmax_scale=1.0 + rank)
    with pytest.raises(ValueError, match="labels must be a"):
        shift_labels_cp(torch.zeros(4, dtype=torch.long), group=dist.group.WORLD)
    dist.barrier()


def test_cp_validation_2_ranks():
    _spawn("_validation", 2)


def _helpers(rank: int, world: int) -> None:
    """cp_shard / cp_positions / shift_labels_cp in both layouts against the whole sequence."""
    group = dist.group.WORLD
    t = 4 * world
    labels = torch.arange(100, 100 + 2 * t).view(2, t)
    for layout in ("contiguous", "zigzag"):
        pos = cp_positions(rank, world, t // world, layout=layout)
        assert torch.equal(cp_shard(torch.arange(t)[None], group=group, layout=layout)[0], pos), layout
        whole = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
        got = shift_labels_cp(cp_shard(labels, group=group, layout=layout), group=group, layout=layout)
        assert torch.equal(got, cp_shard(whole, group=group, layout=layout)), (layout, got)
    assert pos.tolist() == [2 * rank, 2 * rank + 1, 2 * (2 * world - 1 - rank), 2 * (2 * world - 1 - rank) + 1]
    with pytest.raises(ValueError, match="multiple of 4"):
        cp_shard(torch.zeros(1, 6), group=group, layout="zigzag")


def test_cp_shard_positions_labels_2_ranks():
    _spawn("_helpers", 2)


def _saved_summary_bytes(rank: int, world: int) -> None:
    """Activation memory kept for the backward, by a saved-tensor hook: the summaries add
    their means (one row per group) and O(T_local) ints, never a [T_local, n_groups] tensor."""
    hq, hkv, d, left = 4, 2, 16, 8
    row = hkv * 2 * d * 4  # one position's (or group's) k | v, fp32
    for tl, g in ((64, 2), (128, 2), (128, 8)):
        gen = torch.Generator().manual_seed(rank)
        q, k, v = (torch.randn(1, tl, h, d, generator=gen, requires_grad=True) for h in (hq, hkv, hkv))
        saved = {}
        for summ in (True, False):
            seen: dict[int, int] = {}

            def pack(x):
                seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
                return x

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                swa_attention_cp(q, k, v, group=dist.group.WORLD, window=(left, 0), group_size=g, summaries=summ,
                                 backend="torch")
            saved[summ] = sum(seen.values())
        n_groups = (rank * tl + tl - 1 - left) // g
        extra = saved[True] - saved[False]
        # the means (fp32 here), int32 slot indices of the positions and groups, 1 / group size
        assert extra <= n_groups * (row + 8) + 4 * tl + 512, (tl, g, n_groups, extra)
        assert saved[False] <= (3 * tl + left) * hq * d * 4 + 4 * hq * tl + 1024, saved  # q, k|v + halo, lse


def test_cp_saved_memory_is_linear_2_ranks():
    _spawn("_saved_summary_bytes", 2)


def test_cp_rank_work_balanced_by_zigzag():
    """At T=128k, W=2048, G=256 over 8 ranks the zigzag shards keep every rank's work (key tiles
    the forward visits, visible pairs) within 10% of the first's, with no padded query rows;
    contiguous shards do not (the last rank's queries see ~500 summaries, the first's ~25)."""
    from dataclasses import replace

    from dasg_model.parallel.cost import REFERENCE_CP, cp_rank_work

    for layout, within in (("zigzag", True), ("contiguous", False)):
        work = cp_rank_work(replace(REFERENCE_CP, layout=layout), 8)
        for key in ("tiles", "pairs"):
            ratio = max(w[key] for w in work) / work[0][key]
            assert (ratio <= 1.10) == within, (layout, key, ratio)
        assert all(w["rows"] == 131072 // 8 for w in work)
    small = cp_rank_work(replace(REFERENCE_CP, seq=64, window=-1, group_size=8, layout="zigzag"), 4,
                         block_m=4, block_n=4)
    assert [w["pairs"] for w in small] == [sum(range(1 + 8 * c, 9 + 8 * c)) + sum(range(57 - 8 * c, 65 - 8 * c))
                                           for c in range(4)]


def test_distributed_is_the_compatible_import_path():
    from dasg_kernels import context_parallel, distributed

    assert set(distributed.__all__) == set(context_parallel.__all__)
    for name in distributed.__all__:
        assert getattr(distributed, name) is getattr(context_parallel, name), name


def test_cp_needs_initialised_group():
    assert not dist.is_initialized()
    x = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="group needs an initialised torch.distributed"):
        swa_attention_cp(x, x, x, group=None, window=(2, 0))


# --------------------------------------------------------------------------- model


def _tiny_models(window: int, group_size: int) -> tuple[DASGConfig, DASGForCausalLM, DASGForCausalLM]:
    """A small DASG model (torch backend, summaries on, seed 0) and an identical copy for CP."""
    cfg = DASGConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                     attention_window=window, group_size=group_size, use_summaries=True, shallow_shared_size=32,
                     deep_shared_size=64, shallow_num_experts=4, shallow_expert_size=32, deep_num_experts=4,
                     deep_expert_size=32, top_p=0.6, k_max=2, complexity_threshold=0.5, backend="torch")
    torch.manual_seed(0)
    model = DASGForCausalLM(cfg)
    return cfg, model, copy.deepcopy(model)


def _model(rank: int, world: int, tl: int, layout: str = "contiguous") -> None:
    cfg, model, cp_model = _tiny_models(window=5, group_size=4)
    gen = torch.Generator().manual_seed(1)
    t = world * tl
    ids = torch.randint(0, cfg.vocab_size, (2, t), generator=gen)
    labels = ids.clone()
    labels[0, 2] = -100
    labels[1, tl] = -100  # the target of rank 0's last position (from rank 1's shard) is ignored

    ref = model(ids, labels=labels)
    ref.lm_loss.backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    apply_context_parallel(cp_model, mesh["cp"], layout=layout)

    def shard(x):
        return cp_shard(x, group=mesh["cp"], layout=layout)

    out = cp_model(shard(ids), labels=shard(labels))
    out.lm_loss.backward()

    tol = dict(atol=1e-4, rtol=1e-4)
    assert_close(out.logits, shard(ref.logits).detach(), **tol, msg=lambda m: f"rank {rank} logits: {m}")
    loss = out.lm_loss.detach().clone()
    dist.all_reduce(loss)
    assert_close(loss / world, ref.lm_loss.detach(), **tol, msg=lambda m: f"rank {rank} lm_loss: {m}")
    names = []
    for n, p in cp_model.named_parameters():
        if n not in ref_grads:
            continue
        gsum = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(gsum)
        assert_close(gsum / world, ref_grads[n], **tol, msg=lambda m, n=n: f"rank {rank} grad {n}: {m}")
        names.append(n)
    assert any("q_proj" in n for n in names) and any("embed_tokens" in n for n in names)

    remove_context_parallel(cp_model)  # whole sequences again, on every rank
    assert_close(cp_model(ids).logits, ref.logits.detach(), **tol, msg=lambda m: f"rank {rank} after remove: {m}")


def _model_packed(rank: int, world: int, tl: int, bounds: list[int], layout: str = "contiguous") -> None:
    """A packed row (DataCollatorWithFlattening's cu_seq_lens keywords, offsets into the whole
    sequence) under CP: logits and parameter gradients (summed over the ranks) equal one process
    on the whole row, documents crossing shards included."""
    cfg, model, cp_model = _tiny_models(window=3, group_size=2)
    gen = torch.Generator().manual_seed(1)
    t = world * tl
    ids = torch.randint(0, cfg.vocab_size, (1, t), generator=gen)
    w = torch.randn(1, t, cfg.vocab_size, generator=gen)
    cu = torch.tensor(bounds, dtype=torch.int32)
    mx = max(b - a for a, b in zip(bounds, bounds[1:]))
    docs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=mx, max_length_k=mx)

    ref = model(ids, **docs)
    (ref.logits * w).sum().backward()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    apply_context_parallel(cp_model, mesh["cp"], layout=layout)

    def shard(x):
        return cp_shard(x, group=mesh["cp"], layout=layout)

    out = cp_model(shard(ids), **docs)
    (out.logits * shard(w)).sum().backward()
    tol = dict(atol=1e-4, rtol=1e-4)
    assert_close(out.logits, shard(ref.logits).detach(), **tol, msg=lambda m: f"rank {rank} logits: {m}")
    for n, p in cp_model.named_parameters():
        ref_g = dict(model.named_parameters())[n].grad
        if ref_g is None:
            continue
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        assert_close(g, ref_g, **tol, msg=lambda m, n=n: f"rank {rank} grad {n}: {m}")
    # positions are per document: the same ids as one document give other logits
    one = cp_model(shard(ids)).logits
    assert not torch.allclose(one, out.logits, atol=1e-3)


def test_cp_model_packed_documents_2_ranks():
    _spawn("_model_packed", 2, 8, [0, 3, 11, 16])                # the middle document spans both ranks


def test_cp_model_packed_documents_zigzag_2_ranks():
    _spawn("_model_packed", 2, 8, [0, 6, 7, 13, 16], "zigzag")   # a 1-token document, chunks of 4


def test_cp_model_2_ranks():
    _spawn("_model", 2, 7)  # T_local = 7: not a multiple of G = 4 or of the window 5


def test_cp_model_4_ranks():
    _spawn("_model", 4, 3)  # window 5 > T_local = 3: halo from two ranks


def test_cp_model_zigzag_2_ranks():
    _spawn("_model", 2, 6, "zigzag")  # chunks of 3 < window 5: halos of two chunks, RoPE and labels zigzag
