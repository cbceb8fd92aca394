"""Context parallelism on gloo/CPU: ``swa_attention_cp`` and ``apply_context_parallel`` against one process.

Each test starts 2 or 4 processes (``torch.multiprocessing.start_processes``, forked on
Linux, spawned elsewhere; gloo over
``tcp://127.0.0.1:<free port>``, one thread each). Every rank builds the whole problem
from the same seed, computes the single-process result itself (the fp32 reference
``reference.swa_attention_ref``, the oracle ``swa_attention`` is tested against, or the
unsharded model) and compares its shard of the output and of the gradients; an assertion
in any rank fails the test with that rank's traceback.

Tolerances (fp32): attention ``atol = rtol = 1e-5`` on the torch path, ``1e-4`` through
the Triton kernels (interpreter); the model ``atol = rtol = 1e-4`` (logits, loss,
parameter gradients averaged over the CP ranks).
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
from dasg_kernels.distributed import cp_comm_stats, shift_labels_cp, swa_attention_cp
from dasg_model import DASGConfig, DASGForCausalLM
from dasg_model.parallel import apply_context_parallel
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
                     hq: int = 2, hkv: int = 1, d: int = 8, b: int = 2, backend: str = "torch",
                     tol: float = 1e-5, seed: int = 0, group=None) -> None:
    """``rank``, ``world``: this process's place in ``group`` (default: the whole world)."""
    group = dist.group.WORLD if group is None else group
    gen = torch.Generator().manual_seed(seed)
    t = world * tl
    q = torch.randn(b, t, hq, d, generator=gen)
    k = torch.randn(b, t, hkv, d, generator=gen)
    v = torch.randn(b, t, hkv, d, generator=gen)
    dout = torch.randn(b, t, hq, d, generator=gen)
    kw = dict(window=(left, 0), causal=True, group_size=g, summaries=summaries)

    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    ref, _ = reference.swa_attention_ref(qf, kf, vf, **kw)
    (ref * dout).sum().backward()

    sl = slice(rank * tl, (rank + 1) * tl)
    ql, kl, vl = (x[:, sl].clone().requires_grad_() for x in (q, k, v))
    cp_comm_stats(reset=True)
    out = swa_attention_cp(ql, kl, vl, group=group, backend=backend, **kw)
    (out * dout[:, sl]).sum().backward()
    _check_bytes(cp_comm_stats(reset=True), rank, world, tl=tl, left=left, g=g, summaries=summaries,
                 row_bytes=b * hkv * 2 * d * 4)

    t_ = dict(atol=tol, rtol=tol)
    assert_close(out, ref[:, sl].detach(), **t_, msg=lambda m: f"out: {m}")
    assert_close(ql.grad, qf.grad[:, sl], **t_, msg=lambda m: f"dq: {m}")
    assert_close(kl.grad, kf.grad[:, sl], **t_, msg=lambda m: f"dk: {m}")
    assert_close(vl.grad, vf.grad[:, sl], **t_, msg=lambda m: f"dv: {m}")


def _check_bytes(sent: dict, rank: int, world: int, *, tl, left, g, summaries, row_bytes) -> None:
    """The counted bytes against the exchange's geometry: the halo rows of later ranks that lie
    in this shard (and, backward, this rank's own halo coming back), the partial means once
    per other rank."""
    def halo(p):  # global positions rank p needs from before its shard
        return range(0 if left < 0 else max(0, p * tl - left), p * tl)

    mine = range(rank * tl, (rank + 1) * tl)
    out_rows = sum(len(set(halo(p)) & set(mine)) for p in range(rank + 1, world))
    assert sent.get("halo", 0) == out_rows * row_bytes, f"halo bytes {sent}: want {out_rows} rows"
    assert sent.get("halo_bwd", 0) == len(halo(rank)) * row_bytes, f"halo_bwd bytes {sent}"
    n_any = (world * tl - 1 - left) // g if summaries and left >= 0 else 0
    if n_any > 0:
        slots = -(-(tl - 1) // g) + 1
        assert sent["summaries"] == (world - 1) * slots * row_bytes, f"summary bytes {sent}: {slots} slots"
        assert sent["summaries_bwd"] == 2 * (world - 1) * slots * row_bytes, f"summary grad bytes {sent}"
    else:
        assert "summaries" not in sent and "summaries_bwd" not in sent, sent
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
    dict(tl=6, left=-1, g=None, summaries=False, hq=4, hkv=2),  # full causal, GQA
    dict(tl=9, left=2, g=4, summaries=False),
    dict(tl=5, left=0, g=2, summaries=True),                    # no halo, summaries only
    dict(tl=7, left=3, g=3, summaries=True, backend="auto", seed=1),
]
CASES_4 = [
    dict(tl=5, left=11, g=3, summaries=True),                   # halo from 3 ranks
    dict(tl=3, left=2, g=8, summaries=True),                    # a group spans 3 shards
    dict(tl=4, left=6, g=None, summaries=False, hq=4, hkv=2),
    dict(tl=6, left=-1, g=4, summaries=True),                   # full window: summaries never seen
    dict(tl=7, left=4, g=3, summaries=True, hq=4, hkv=1, backend="auto", seed=2),
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
        dict(tl=7, left=3, g=3, summaries=True, d=32, b=1, backend="triton", tol=1e-4),
        dict(tl=5, left=8, g=None, summaries=False, d=32, b=1, hq=2, hkv=2, backend="triton", tol=1e-4),
    ]
    _spawn("_attention_cases", 2, cases)


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
    with pytest.raises(ValueError, match="labels must be a"):
        shift_labels_cp(torch.zeros(4, dtype=torch.long), group=dist.group.WORLD)
    dist.barrier()


def test_cp_validation_2_ranks():
    _spawn("_validation", 2)


def test_cp_needs_initialised_group():
    assert not dist.is_initialized()
    x = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="group needs an initialised torch.distributed"):
        swa_attention_cp(x, x, x, group=None, window=(2, 0))


# --------------------------------------------------------------------------- model


def _model(rank: int, world: int, tl: int) -> None:
    cfg = DASGConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                     attention_window=5, group_size=4, use_summaries=True, shallow_shared_size=32,
                     deep_shared_size=64, shallow_num_experts=4, shallow_expert_size=32, deep_num_experts=4,
                     deep_expert_size=32, top_p=0.6, k_max=2, complexity_threshold=0.5, backend="torch")
    torch.manual_seed(0)
    model = DASGForCausalLM(cfg)
    cp_model = copy.deepcopy(model)
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
    apply_context_parallel(cp_model, mesh["cp"])
    sl = slice(rank * tl, (rank + 1) * tl)
    out = cp_model(ids[:, sl], labels=labels[:, sl])
    out.lm_loss.backward()

    tol = dict(atol=1e-4, rtol=1e-4)
    assert_close(out.logits, ref.logits[:, sl].detach(), **tol, msg=lambda m: f"rank {rank} logits: {m}")
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


def test_cp_model_2_ranks():
    _spawn("_model", 2, 7)  # T_local = 7: not a multiple of G = 4 or of the window 5


def test_cp_model_4_ranks():
    _spawn("_model", 4, 3)  # window 5 > T_local = 3: halo from two ranks
