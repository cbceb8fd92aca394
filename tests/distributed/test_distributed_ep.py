"""Expert parallelism on torch.distributed: gloo on the CPU, 2 and 4 processes.

Every child builds the same model from one seed, runs the single-process reference on the
concatenation of all ranks' tokens itself, then the expert-parallel copy on its own shard,
and compares (fp32), in both exchange modes (per (token, rank), the default, and per
(token, slot) with ``bitwise=True``). ``TRITON_INTERPRET`` is removed from the children's environment, so
``backend="auto"`` resolves to the PyTorch path there (as on a CPU-only machine).
Children are forked (spawned where fork is missing) and use one thread each.
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from _helpers import free_port, run_ranks
from torch.distributed.device_mesh import init_device_mesh

from dasg_model import DASGConfig, DASGForCausalLM, DASGMoE
from dasg_model.parallel import apply_expert_parallel
from dasg_model.parallel.cost import (CPWorkload, EPWorkload, cp_layer_cost, ep_bytes_per_row, ep_layer_cost,
                                      kernel_rates, scaleout_markdown, scaleout_rows)
from dasg_model.parallel.expert import ExpertParallelExperts, allreduce_gradients, ep_comm_stats
from torch.distributed.tensor import DTensor, Shard

# --------------------------------------------------------------------------- spawning


@contextmanager
def _child_env(interpret: bool = False):
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "OMP_NUM_THREADS")}
    if not interpret:
        os.environ.pop("TRITON_INTERPRET", None)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int, *args, interpret: bool = False) -> None:
    # The environment change counts in the children: dasg_kernels reads TRITON_INTERPRET at
    # each dispatch, so "auto" runs the PyTorch path there unless ``interpret``.
    with _child_env(interpret):
        run_ranks(_entry, world, (world, free_port(), fn, args))


# --------------------------------------------------------------------------- checks


def _close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-5) -> None:
    assert got is not None, f"{name}: no gradient"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = want.double().abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale + 1e-8, f"{name}: max error {err:.3e} (scale {scale:.3e})"


def _moe_config(backend: str, **changes):
    base = dict(hidden_size=32, shallow_shared_size=16, deep_shared_size=32, shallow_num_experts=8,
                shallow_expert_size=16, deep_num_experts=8, deep_expert_size=32, top_p=0.7, k_max=2,
                complexity_threshold=0.5, backend=backend)
    base.update(changes)
    return DASGConfig(**base)


def _owner(model, name):
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def _loss(y, g, aux, scale):
    return (y * g).sum() * scale + 0.5 * aux["load_balance"] + 0.3 * aux["z_loss"] + 0.7 * aux["entropy"]


def _ranks_visited(ids: torch.Tensor, e_local: int, active: torch.Tensor) -> float:
    """Reference mean number of distinct EP ranks per active token (a plain loop)."""
    vals = [len({int(e) // e_local for e in row if e >= 0}) for row in ids[active]]
    return sum(vals) / max(len(vals), 1)


def _remote_destinations(router_out, moe, world: int, me: int) -> tuple[int, int, int]:
    """Reference (plain loops) counts of this rank's routed rows that leave it: distinct
    (token, rank) pairs over both levels, distinct (token, rank, level), (token, slot, level)."""
    tr, trl, ts = set(), set(), 0
    for name in ("shallow", "deep"):
        ids = router_out.levels[name].routing.expert_ids
        e_loc = getattr(moe, f"{name}_experts").num_experts // world
        for t, row in enumerate(ids.tolist()):
            for e in row:
                if e >= 0 and e // e_loc != me:
                    tr.add((t, e // e_loc))
                    trl.add((t, e // e_loc, name))
                    ts += 1
    return len(tr), len(trl), ts


def _local_grad(p: torch.Tensor) -> torch.Tensor:
    g = p.grad
    return g.to_local() if isinstance(g, DTensor) else g


def _check_moe(rank, world, backend, changes, mesh, n_per_rank=24, zero_rank=None, bitwise=False):

    cfg = _moe_config(backend, **changes)
    torch.manual_seed(0)
    moe = DASGMoE(cfg)
    d = cfg.hidden_size
    x_all = torch.randn(world * n_per_rank, d)
    g_all = torch.randn(world * n_per_rank, d)
    with torch.no_grad():
        for lin in (moe.router.shallow_router, moe.router.deep_router):
            lin.weight.normal_(std=0.4)  # peaked routing: top-p picks 1 or 2 experts
        moe.routed_scale.copy_(torch.tensor([0.9, 1.1]))
        if zero_rank is not None:
            # every token to the experts of EP rank 0: a strong common feature and router column
            x_all[:, 0] = 4.0
            for lin in (moe.router.shallow_router, moe.router.deep_router):
                e_loc = lin.weight.shape[0] // world
                lin.weight[:, 0] = -3.0
                lin.weight[:e_loc, 0] = 3.0
    ref = copy.deepcopy(moe)
    xr = x_all.clone().requires_grad_()
    y_ref, out_ref = ref(xr)
    _loss(y_ref, g_all, out_ref.aux_losses, 1.0 / world).backward()
    sl = slice(rank * n_per_rank, (rank + 1) * n_per_rank)
    with torch.no_grad():  # the unsharded layer on this shard's rows only (same GEMM shapes)
        y_shard, out_shard = copy.deepcopy(moe)(x_all[sl])

    ep_moe = apply_expert_parallel(copy.deepcopy(moe), mesh, bitwise=bitwise)
    x = x_all[sl].clone().requires_grad_()
    y, out = ep_moe(x)
    _loss(y, g_all[sl], out.aux_losses, 1.0).backward()
    allreduce_gradients(ep_moe, mesh)

    # forward: bitwise=True on the torch path (fp32, k_max=2: the slot sum is the unsharded
    # layer's expert-order sum) equals the unsharded layer on the same rows bitwise; the
    # per-rank exchange sums per rank first, and the Triton kernel combines inside: to rounding
    if backend != "triton" and bitwise:
        assert torch.equal(y, y_shard), f"y differs by {(y - y_shard).abs().max():.3e}"
    _close("y", y, y_ref[sl], 1e-5 if backend == "triton" else 1e-6)
    for k, v in out_ref.aux_losses.items():
        _close(f"aux {k}", out.aux_losses[k].detach(), v.detach(), 1e-5)
    for k, v in out_ref.stats.items():
        if k.endswith("tokens_per_expert"):
            assert torch.equal(out.stats[k], v), f"{k}: {out.stats[k]} != {v}"
        else:
            _close(f"stat {k}", out.stats[k], v, 1e-5)
    assert 0 < float(out.stats["deep_fraction"]) < 1, "the test needs tokens on both levels"
    for name in ("shallow", "deep"):
        lr = out_ref.router.levels[name]
        e_loc = getattr(moe, f"{name}_experts").num_experts // world
        want = _ranks_visited(lr.routing.expert_ids, e_loc, lr.active)
        got = float(out.stats[f"{name}/mean_ranks_per_token"])
        assert abs(got - want) < 1e-5, f"{name}/mean_ranks_per_token {got} != {want}"
        if cfg.n_group % world == 0 and cfg.topk_group is not None:
            assert got <= cfg.topk_group + 1e-6, f"{name}: {got} ranks per token > topk_group={cfg.topk_group}"

    # gradients: x (rank-local loss: ep times the mean objective), every parameter
    _close("x.grad", x.grad, xr.grad[sl] * world)
    ref_params = dict(ref.named_parameters())
    for name, p in ep_moe.named_parameters():
        want = ref_params[name].grad
        bank = _owner(ep_moe, name)
        if isinstance(bank, ExpertParallelExperts):
            assert isinstance(p, DTensor) and p.placements == (Shard(0),), f"{name}: {type(p).__name__}"
            assert p.shape == want.shape and p.to_local().shape[0] == bank.global_num_experts // world
            want = want[bank.expert_offset: bank.expert_offset + bank.num_experts]
        _close(f"{name}.grad", _local_grad(p), want)
    assert isinstance(ep_moe.shallow_experts, ExpertParallelExperts)
    assert isinstance(ep_moe.deep_experts, ExpertParallelExperts)
    assert not isinstance(ep_moe.shared.shallow, ExpertParallelExperts)

    comm = ep_comm_stats(ep_moe)
    assert comm["host_syncs"] == 1
    # the gradients retrace the rows: what a rank dispatched comes back as combine gradients
    assert comm["dispatch"] == comm.get("combine_bwd", 0) and comm.get("combine", 0) == comm.get("dispatch_bwd", 0)
    tot = torch.tensor([comm["dispatch"], comm.get("combine", 0)], dtype=torch.float64)
    dist.all_reduce(tot)
    assert tot[0] == tot[1] and (world == 1 or tot[0] > 0)
    # rows: the plain-loop destinations of this rank's tokens
    tr, trl, ts = _remote_destinations(out_shard.router, moe, world, rank)
    assert (comm["rows/token_rank"], comm["rows/token_rank_level"], comm["rows/token_slot"]) == (tr, trl, ts)
    k_all = 2 * cfg.k_max
    if bitwise:
        assert comm["rows/sent"] == ts and comm["dispatch"] == ts * d * 4
    else:  # one row per (token, rank): D fp32 values, K fp32 weights and K int8 ids
        assert comm["rows/sent"] == tr and comm["dispatch"] == tr * d * 4
        assert comm["dispatch_meta"] == tr * k_all * 5
    return out, ep_moe


def _moe_worker(rank, world):
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    for backend in ("torch", "auto"):
        _check_moe(rank, world, backend, {}, mesh)
        # ADR groups on EP ranks: each token's experts lie on at most topk_group ranks
        out, _ = _check_moe(rank, world, backend, dict(n_group=world, topk_group=1), mesh)
        for name in ("shallow", "deep"):
            assert abs(float(out.stats[f"{name}/mean_ranks_per_token"]) - 1.0) < 1e-6
    # the same with a process group instead of a mesh, and a wider group limit
    _check_moe(rank, world, "torch", dict(n_group=world, topk_group=2), None)
    # the per-slot exchange
    _check_moe(rank, world, "torch", {}, mesh, bitwise=True)
    _check_moe(rank, world, "auto", dict(n_group=world, topk_group=1), None, bitwise=True)


def _triton_worker(rank, world):
    # the grouped Triton expert kernels on the received rows (interpreted on the CPU)
    _check_moe(rank, world, "triton", dict(n_group=world, topk_group=1), None, n_per_rank=12)


def _zero_worker(rank, world):

    for backend, bitwise in (("torch", False), ("auto", False), ("torch", True)):
        out, ep_moe = _check_moe(rank, world, backend, {}, None, zero_rank=0, bitwise=bitwise)
        for name in ("shallow", "deep"):
            counts = out.stats[f"{name}/tokens_per_expert"]
            e_loc = counts.shape[0] // world
            assert counts[:e_loc].sum() > 0 and counts[e_loc:].sum() == 0, f"{name}: {counts}"
        if rank != 0:
            assert ep_moe.ep_comm.bytes.get("combine", 0) == 0  # received nothing, sent nothing back
            for p in (ep_moe.shallow_experts.gate_up_proj, ep_moe.deep_experts.down_proj):
                assert p.grad is not None and torch.count_nonzero(_local_grad(p)) == 0

    # E not divisible by the EP size: a clear ValueError, the model untouched
    moe = DASGMoE(_moe_config("torch", shallow_num_experts=3, deep_num_experts=4, k_max=2))
    with pytest.raises(ValueError, match=r"E=3 experts, not divisible by the EP size 2"):
        apply_expert_parallel(moe, None)
    assert moe.shallow_experts.num_experts == 3 and type(moe) is DASGMoE
    with pytest.raises(TypeError, match=r"bitwise must be a bool"):
        apply_expert_parallel(DASGMoE(_moe_config("torch")), None, bitwise=1)


_A2A = ("dispatch", "dispatch_meta", "combine", "dispatch_bwd", "dispatch_meta_bwd", "combine_bwd")


def _slot_order_worker(rank, world):
    # k_max=4 with a flat router: tokens pick 3-4 experts, so the combine order matters in fp32.
    # Each rank also runs the layer on a one-rank EP group over every token (ep=1): with
    # bitwise=True the shard of the world-size EP result and its input gradients must be
    # bitwise the same; the per-rank exchange equals it to rounding, is deterministic, and
    # moves at most 1.1x the bytes of one row per distinct (token, rank, level) each way.
    solo = [dist.new_group([r]) for r in range(world)][rank]
    torch.manual_seed(0)
    moe = DASGMoE(_moe_config("torch", top_p=0.95, k_max=4))
    with torch.no_grad():
        for lin in (moe.router.shallow_router, moe.router.deep_router):
            lin.weight.normal_(std=0.1)
    n = 12
    x_all, g_all = torch.randn(world * n, 32), torch.randn(world * n, 32)
    sl = slice(rank * n, (rank + 1) * n)

    def run(group, x, g, bitwise):
        m = apply_expert_parallel(copy.deepcopy(moe), group, bitwise=bitwise)
        x = x.clone().requires_grad_()
        y, out = m(x)
        (y * g).sum().backward()
        return y.detach(), x.grad, out, ep_comm_stats(m)

    y1, gx1, out1, _ = run(solo, x_all, g_all, True)
    y, gx, out, comm_slot = run(None, x_all[sl], g_all[sl], True)
    ks = [(lvl.routing.expert_ids >= 0).sum(1) for lvl in out1.router.levels.values()]
    assert max(int(k.max()) for k in ks) >= 3, "the test needs tokens with 3+ experts"
    assert torch.equal(y, y1[sl]), f"ep={world} vs ep=1: y differs by {(y - y1[sl]).abs().max():.3e}"
    assert torch.equal(gx, gx1[sl]), f"ep={world} vs ep=1: x.grad differs by {(gx - gx1[sl]).abs().max():.3e}"

    yr, gxr, _, comm = run(None, x_all[sl], g_all[sl], False)
    yr2, gxr2, _, _ = run(None, x_all[sl], g_all[sl], False)
    assert torch.equal(yr, yr2) and torch.equal(gxr, gxr2), "per-rank exchange: two runs differ"
    _close("per-rank y", yr, y1[sl], 1e-6)
    _close("per-rank x.grad", gxr, gx1[sl], 1e-6)
    # bytes per step over all ranks; one row each way per destination, forward and backward
    row_bytes = 32 * 4
    tot = torch.tensor([sum(comm.get(k, 0) for k in _A2A), sum(comm_slot.get(k, 0) for k in _A2A),
                        comm["rows/token_rank_level"], comm["rows/token_slot"]], dtype=torch.float64)
    dist.all_reduce(tot)
    sent, sent_slot, trl, ts = tot.tolist()
    assert 0 < trl < ts and sent_slot == 4 * ts * row_bytes
    assert sent <= 1.1 * 4 * trl * row_bytes, f"per-rank exchange: {sent} B > 1.1 x {4 * trl * row_bytes} B"
    rows = torch.tensor([comm["rows/sent"]], dtype=torch.float64)
    dist.all_reduce(rows)
    assert sent == rows.item() * sum(ep_bytes_per_row(32, 4, 8)), "the cost model's bytes per row"


@pytest.mark.parametrize("world", [2, 4])
def test_ep_result_independent_of_ep_size(world):
    """k_max=4 (3-4 experts per token): with bitwise=True the EP output and input gradients are
    bitwise those of the same layer on one rank (the combine sums in the fixed slot order, not
    arrival order); the default per-rank exchange equals them to rounding, is deterministic and
    sends at most 1.1x one row per distinct (token, rank, level)."""
    _spawn(_slot_order_worker, world)


def _overlap_worker(rank, world):
    import dasg_model.parallel.expert as E

    torch.manual_seed(0)
    moe = DASGMoE(_moe_config("torch"))
    x = torch.randn(16, 32)
    real_wait, real_aux = E._Pending.wait, E.ExpertParallelDASGMoE._finish_aux
    for bitwise in (False, True):
        m = apply_expert_parallel(copy.deepcopy(moe), None, bitwise=bitwise)
        log = []

        def logged(name, fn):
            return lambda *a, **k: (log.append(name), fn(*a, **k))[1]

        m.shared.forward = logged("shared", m.shared.forward)
        for bank in (m.shallow_experts, m.deep_experts):
            bank.forward = logged("expert", bank.forward)
        E._Pending.wait, E.ExpertParallelDASGMoE._finish_aux = logged("wait", real_wait), logged("aux", real_aux)
        try:
            m(x)
        finally:
            E._Pending.wait, E.ExpertParallelDASGMoE._finish_aux = real_wait, real_aux
        # the dispatch is issued; the shared experts (and per-rank this rank's own rows, both
        # levels) run before it is waited for; the aux all_reduce is waited for last
        want = ("shared wait expert expert wait aux" if bitwise
                else "shared expert expert wait wait wait expert expert wait aux")
        assert " ".join(log) == want, " ".join(log)
        assert m.ep_comm.host_syncs == 1

    # bf16: output and input gradient within 2x the unsharded bf16 layer's error (fp32 reference)
    n = 16
    x_all, g_all = torch.randn(world * n, 32), torch.randn(world * n, 32)
    sl = slice(rank * n, (rank + 1) * n)

    def run(layer, x, g):
        x = x.clone().requires_grad_()
        y, _ = layer(x)
        (y.float() * g).sum().backward()
        return y.detach().float(), x.grad.float()

    y32, gx32 = run(copy.deepcopy(moe), x_all[sl], g_all[sl])
    y16, gx16 = run(copy.deepcopy(moe).to(torch.bfloat16), x_all[sl].bfloat16(), g_all[sl])
    for bitwise in (False, True):
        m = apply_expert_parallel(copy.deepcopy(moe).to(torch.bfloat16), None, bitwise=bitwise)
        y, gx = run(m, x_all[sl].bfloat16(), g_all[sl])
        for name, got, base, ref in (("y", y, y16, y32), ("x.grad", gx, gx16, gx32)):
            err, tol = (got - ref).abs().max(), 2 * (base - ref).abs().max()
            assert err <= tol, f"bf16 bitwise={bitwise} {name}: {err:.3e} > {tol:.3e}"


def test_ep_overlap_order():
    """The dispatch is issued before the shared experts (and, per-rank, this rank's own expert
    rows) run, and waited for only after them; the aux all_reduce is waited for last. bf16 in
    both exchange modes: within 2x the unsharded bf16 layer's error."""
    _spawn(_overlap_worker, 2)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train_worker(rank, world, backend, fsdp=False):

    dp, ep = 2, 2
    mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep"))
    d_rank, e_rank = mesh["dp"].get_local_rank(), mesh["ep"].get_local_rank()
    assert rank == d_rank * ep + e_rank
    cfg = DASGConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     attention_window=8, group_size=4, shallow_shared_size=16, deep_shared_size=32,
                     shallow_num_experts=4, shallow_expert_size=16, deep_num_experts=4, deep_expert_size=32,
                     top_p=0.7, k_max=2, load_balance_coef=0.1, z_loss_coef=0.01, entropy_coef=0.05,
                     backend=backend)
    torch.manual_seed(0)
    model = DASGForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.moe.router.shallow_router, layer.moe.router.deep_router):
                lin.weight.normal_(std=0.3)
    b_rank, t = 2, 16
    ids = torch.randint(0, cfg.vocab_size, (world * b_rank, t))

    # single process: gradient accumulation over the dp groups' batches (each is the
    # concatenation of the EP group's sequences; aux losses are per EP group)
    ref = copy.deepcopy(model)
    ref_losses = []
    for d in range(dp):
        batch = ids[d * ep * b_rank: (d + 1) * ep * b_rank]
        ref_losses.append(ref(batch, labels=batch).loss)
    ref_loss = torch.stack(ref_losses).mean()
    ref_loss.backward()

    ep_model = apply_expert_parallel(copy.deepcopy(model), mesh["ep"])
    if fsdp:
        # FSDP2 on the 2-D mesh: the expert DTensors (Shard(0) over ep) sharded over dp too,
        # everything else HSDP (replicated over dp, sharded over ep); 0-dim parameters are not
        # shardable
        from torch.distributed.fsdp import fully_shard

        for m in ep_model.modules():
            if isinstance(m, ExpertParallelExperts):
                fully_shard(m, mesh=mesh["dp"])
                # the expert grads already sum the EP group's losses: FSDP divides by dp * ep
                # (a sum reduction then a division here: gloo lacks PREMUL_SUM)
                m.set_gradient_divide_factor(float(dp * ep))
                m.set_force_sum_reduction_for_comms(True)
        scalars = {n: p for n, p in ep_model.named_parameters() if p.dim() == 0}
        assert sorted(scalars) == [f"model.layers.{i}.moe.shared.shallow_scale" for i in range(cfg.num_layers)]
        fully_shard(ep_model, mesh=mesh, ignored_params=set(scalars.values()))
    mine = ids[rank * b_rank: (rank + 1) * b_rank]
    loss = ep_model(mine, labels=mine).loss
    loss.backward()
    if fsdp:
        for p in scalars.values():
            dist.all_reduce(p.grad)
            p.grad.div_(world)
    else:
        allreduce_gradients(ep_model, mesh["ep"], mesh["dp"])
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    _close("loss", mean_loss / world, ref_loss.detach(), 1e-5)

    ref_params = dict(ref.named_parameters())
    n_expert = 0
    for name, p in ep_model.named_parameters():
        if isinstance(_owner(ep_model, name), ExpertParallelExperts):
            assert isinstance(p, DTensor) and isinstance(p.grad, DTensor)
            n_expert += 1
        _close(f"{name}.grad", _full(p.grad), ref_params[name].grad, 5e-5)  # experts: the whole bank
    assert n_expert == 2 * 2 * cfg.num_layers

    # one SGD step each: the parameters (slices for the experts) stay equal
    for m in (ref, ep_model):
        torch.optim.SGD(m.parameters(), lr=0.5).step()
    for name, p in ep_model.named_parameters():
        _close(f"{name} after step", _full(p.detach()), ref_params[name].detach(), 1e-5)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("world", [2, 4])
def test_ep_moe_matches_single_process(world):
    """Forward (bitwise), aux losses, stats, ranks per token, and every gradient (x, router,
    gate, shared experts, routed_scale, expert slices) equal one process; backends torch
    and auto; topk_group bounds the ranks a token visits when n_group == ep."""
    _spawn(_moe_worker, world)


def test_ep_moe_triton_kernels_interpreted():
    """backend="triton": the received rows run through the grouped Triton kernels (in the
    CPU interpreter; skipped where it is off, e.g. on a GPU machine)."""
    from dasg_kernels.backend import triton_can_run_on

    if not triton_can_run_on(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on CPU-only machines)")
    _spawn(_triton_worker, 2, interpret=True)


def test_ep_rank_receives_no_tokens_and_indivisible_experts():
    """All tokens routed to rank 0's experts: rank 1 receives nothing, its expert grads are
    zeros, results still equal one process; E=3 over 2 ranks is a ValueError."""
    _spawn(_zero_worker, 2)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_dp_ep_training_step_2x2(backend):
    """DASGForCausalLM on a 2 x 2 (dp x ep) mesh: loss, gradients (replicated ones averaged,
    expert ones DTensors whose full tensor is the whole bank's) and parameters after an SGD
    step equal one process."""
    _spawn(_train_worker, 4, backend)


def test_dp_ep_training_step_2x2_fsdp2():
    """The same step with FSDP2 ``fully_shard`` on the 2-D mesh (expert DTensors over dp with
    the gradient divide factor dp * ep, the rest HSDP) instead of allreduce_gradients; the
    0-dim parameters FSDP2 cannot shard are exactly the ``shared.shallow_scale`` s."""
    _spawn(_train_worker, 4, "torch", True)


# --------------------------------------------------------------------------- cost model


def _simulated_rows(w: EPWorkload, ep: int, n: int, gen: torch.Generator) -> tuple[float, float, float]:
    """Remote (token, rank), (token, rank, level) and (token, slot) rows per token of rank 0
    under uniform routing (groups = EP ranks), by sampling."""
    tr = torch.zeros(n, ep, dtype=torch.bool)
    trl = ts = 0.0
    deep = torch.rand(n, generator=gen) < w.deep_fraction
    for e, k, active in ((w.shallow_experts, int(w.shallow_k), torch.ones(n, dtype=torch.bool)),
                         (w.deep_experts, int(w.deep_k), deep)):
        per = e // ep
        if w.topk_group is None:
            ids = torch.rand(n, e, generator=gen).argsort(1)[:, :k]
        else:  # k experts among those of topk_group random ranks
            ranks = torch.rand(n, ep, generator=gen).argsort(1)[:, :w.topk_group]
            pool = (ranks[:, :, None] * per + torch.arange(per)).reshape(n, -1)
            ids = pool.gather(1, torch.rand(pool.shape, generator=gen).argsort(1)[:, :k])
        hit = torch.zeros(n, ep, dtype=torch.bool).scatter_(1, ids // per, True) & active[:, None]
        tr |= hit
        trl += hit[:, 1:].sum().item()
        ts += ((ids // per != 0) & active[:, None]).sum().item()
    return tr[:, 1:].sum().item() / n, trl / n, ts / n


@pytest.mark.parametrize("shape", [(8, 8, 4, 4, 2, None), (16, 32, 3, 2, 4, None), (16, 16, 4, 4, 8, 2)])
def test_cost_model_rows_match_uniform_routing(shape):
    """The EP cost model's expected remote rows per token equal sampled uniform routing
    (with and without topk_group), and its bytes follow ep_bytes_per_row."""
    e_sh, e_dp, k_sh, k_dp, ep, tg = shape
    w = EPWorkload(tokens=1000, hidden=64, shallow_experts=e_sh, shallow_ffn=32, shallow_k=k_sh, deep_experts=e_dp,
                   deep_ffn=64, deep_k=k_dp, deep_fraction=0.4, topk_group=tg)
    c = ep_layer_cost(w, ep)
    got = _simulated_rows(w, ep, 20000, torch.Generator().manual_seed(0))
    for name, sim in zip(("rows_token_rank", "rows_token_rank_level", "rows_token_slot"), got):
        assert abs(c[name] / w.tokens - sim) <= 0.02 * sim, f"{name}: model {c[name] / w.tokens:.4f} vs {sim:.4f}"
    fwd, bwd = ep_bytes_per_row(64, 2, k_sh + k_dp)
    assert c["bytes_bwd"] == pytest.approx(c["rows_token_rank"] * bwd)
    assert c["bytes_fwd"] == pytest.approx(c["rows_token_rank"] * fwd + (ep - 1) * 8)
    slot = ep_layer_cost(w, ep, bitwise=True)
    assert slot["rows_sent"] == pytest.approx(slot["rows_token_slot"]) and slot["rows_sent"] >= c["rows_sent"]
    with pytest.raises(ValueError, match="must divide"):
        ep_layer_cost(w, 3)


def test_cost_model_cp_and_tables():
    """CP bytes from swa_attention_cp's geometry on a small case worked by hand; times, the
    topologies (hybrid = NVLink up to 8 GPUs) and the markdown table."""
    w = CPWorkload(seq=64, window=20, group_size=8, heads_q=4, heads_kv=2, head_dim=16)
    c = cp_layer_cost(w, 4)
    row = 2 * 2 * 16 * 2  # one position's k | v, 2 kv heads, bf16
    # rank 0 sends 16 halo rows to rank 1 and 4 to rank 2, and 1 + 2 + 2 group contributions to
    # ranks 1-3 (groups 0-1 of 8; ranks 1-3 read 1, 3, 5 groups); rank 3 receives as many
    assert c["bytes_fwd"] == c["bytes_bwd"] == 25 * row and c["summary_bytes"] == 2 * 5 * row
    assert c["compute_s"] > 0 and c["comm_s"] == cp_layer_cost(w, 4, topology="nvlink")["comm_s"]
    assert cp_layer_cost(w, 4, topology="ib")["comm_s"] > c["comm_s"]
    rates = kernel_rates()
    assert all(0 < rates[k] < 1000 for k in ("attn_fwd", "moe_gate_up_fwd", "moe_dw_down"))
    ep = EPWorkload(tokens=512, hidden=64, shallow_experts=8, shallow_ffn=32, shallow_k=2, deep_experts=8,
                    deep_ffn=64, deep_k=2)
    rows = scaleout_rows(ep, w, gpus=(2, 4), cp_weak_local=16)
    assert [r["kind"] for r in rows][:3] == ["EP per-rank", "EP per-slot (bitwise)", "EP per-rank, topk_group=2"]
    text = scaleout_markdown(rows)
    assert text.count("\n") == len(rows) + 1 and "CP, T_local=0k" not in text
