"""dispatch: the expert-sorted plan's invariants, built without host synchronisation."""
import pytest
import torch

import dasg_kernels as dk


def _random_ids(n, k, e, device, drop=0.3):
    """Distinct experts per token (as route gives), a prefix of used slots, some unused."""
    ids = torch.argsort(torch.rand(n, e, device=device), dim=-1)[:, :k].int()
    if drop:
        num = torch.randint(1, k + 1, (n,), device=device)
        ids = torch.where(torch.arange(k, device=device)[None] < num[:, None], ids, -1)
    return ids


def _check_plan(ids, e, block_m, plan):
    n, k = ids.shape
    m = n * k
    flat = ids.reshape(-1).long().cpu()
    row_pair = plan.row_pair.long().cpu()
    pair_row = plan.pair_row.long().cpu()
    offsets = plan.expert_offsets.long().cpu()
    tile_expert = plan.tile_expert.long().cpu()
    counts = torch.bincount(flat[flat >= 0], minlength=e)
    assert torch.equal(plan.tokens_per_expert.long().cpu(), counts)
    assert plan.num_tiles == -(-m // block_m) + min(e, m)
    assert row_pair.numel() == plan.num_tiles * block_m and tile_expert.numel() == plan.num_tiles
    # offsets: block aligned prefix sums of the padded counts
    assert offsets[0] == 0 and torch.all(offsets % block_m == 0)
    assert torch.equal(offsets[1:] - offsets[:-1], (counts + block_m - 1) // block_m * block_m)
    assert offsets[-1] <= plan.num_rows
    # every used (token, slot) pair appears exactly once, unused ones never
    held = row_pair[row_pair >= 0]
    assert torch.equal(torch.sort(held).values, torch.nonzero(flat >= 0).flatten())
    assert torch.all(row_pair[offsets[-1]:] == -1)
    # pair_row is the inverse of row_pair
    used = flat >= 0
    assert torch.all(pair_row[~used] == -1)
    assert torch.equal(row_pair[pair_row[used]], torch.nonzero(used).flatten())
    for x in range(e):
        run = row_pair[offsets[x]:offsets[x + 1]]
        c = int(counts[x])
        # an expert's pairs come first in its run, in their original order (stable), then padding
        assert torch.all(flat[run[:c]] == x)
        assert torch.all(run[:c][1:] > run[:c][:-1])
        assert torch.all(run[c:] == -1)
    # tiles: the expert owning each tile, -1 past the last run
    starts = torch.arange(plan.num_tiles) * block_m
    for t, s in enumerate(starts.tolist()):
        owner = -1
        for x in range(e):
            if offsets[x] <= s < offsets[x + 1]:
                owner = x
        assert tile_expert[t] == owner
    # experts with no pairs own no tile
    assert set(tile_expert[tile_expert >= 0].tolist()) == set(torch.nonzero(counts).flatten().tolist())


BACKENDS = ["triton", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,e,block_m", [(1, 1, 1, 16), (7, 2, 4, 16), (100, 4, 8, 16), (300, 2, 64, 32),
                                           (64, 8, 16, 4), (33, 3, 5, 1), (50, 8, 256, 128)])
def test_dispatch_invariants(device, n, k, e, block_m, backend):
    ids = _random_ids(n, k, e, device)
    plan = dk.dispatch(ids, e, block_m=block_m, backend=backend)
    _check_plan(ids, e, block_m, plan)


@pytest.mark.parametrize("n,k,e,block_m", [(1, 1, 1, 16), (37, 2, 3, 1), (300, 4, 64, 16), (2000, 8, 256, 128),
                                           (1500, 1, 8, 64)])
def test_dispatch_triton_equals_torch(device, n, k, e, block_m):
    # the counting sort and the stable-sort plan agree bit for bit (several chunks at n*k >= 2000)
    ids = _random_ids(n, k, e, device)
    a = dk.dispatch(ids, e, block_m=block_m, backend="triton")
    b = dk.dispatch(ids, e, block_m=block_m, backend="torch")
    for name, x, y in zip(a._fields, a, b):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), name
        else:
            assert x == y, name


def test_dispatch_triton_many_chunks(device):
    # small chunks and scan steps (the carries across chunks and scan steps), and chunks
    # walked in several sub-blocks (the carry inside a chunk)
    from dasg_kernels.moe.dispatch import build_plan_triton
    from dasg_kernels.moe.dispatch_torch import build_plan_torch

    for e, kw in ((8, dict(chunk=16, block_c=16)),  # 132 chunks, 9 scan steps
                  (256, dict(chunk=1024))):         # 3 chunks of 4 sub-blocks (256 pairs each under the interpreter)
        ids = _random_ids(700, 3, e, device)
        a = build_plan_triton(ids, e, 16, **kw)
        b = build_plan_torch(ids, e, 16)
        for name, x, y in zip(a._fields, a, b):
            assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_skewed_and_empty(device, backend):
    # all pairs to one expert; most experts empty; whole rows unused
    ids = torch.full((50, 2), -1, dtype=torch.int32, device=device)
    ids[:, 0] = 3
    ids[::7, 1] = 0
    plan = dk.dispatch(ids, 8, block_m=16, backend=backend)
    _check_plan(ids, 8, 16, plan)
    ids = torch.full((5, 2), -1, dtype=torch.int64, device=device)
    plan = dk.dispatch(ids, 4, block_m=16, backend=backend)
    _check_plan(ids, 4, 16, plan)
    assert torch.all(plan.tile_expert == -1)


def test_dispatch_from_route_counts_and_determinism(device):
    r = dk.route(torch.randn(77, 8, device=device), top_p=0.6, k_max=3)
    a = dk.dispatch(r.expert_ids, 8, block_m=16, tokens_per_expert=r.tokens_per_expert, backend="torch")
    b = dk.dispatch(r.expert_ids, 8, block_m=16)
    _check_plan(r.expert_ids, 8, 16, a)
    for x, y in zip(a, b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_dispatch_bad_arguments(device):
    ids = torch.zeros(4, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="block_m"):
        dk.dispatch(ids, 4, block_m=24)
    with pytest.raises(ValueError, match="num_experts"):
        dk.dispatch(ids, 0, block_m=16)
    with pytest.raises(TypeError, match="expert_ids"):
        dk.dispatch(ids.float(), 4, block_m=16)
    with pytest.raises(ValueError, match="expert_ids"):
        dk.dispatch(ids.flatten(), 4, block_m=16)
    if device.type != "cuda":  # the range check would synchronise on CUDA
        with pytest.raises(ValueError, match=r"expert_ids must lie in \[-1, 3\]"):
            dk.dispatch(ids + 4, 4, block_m=16)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        dk.dispatch(ids, 4, block_m=16, tokens_per_expert=torch.zeros(3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="backend"):
        dk.dispatch(ids, 4, block_m=16, backend="cuda")


@pytest.mark.gpu
def test_dispatch_no_host_sync(device):
    r = dk.route(torch.randn(4096, 64, device=device), top_p=0.7, k_max=6)
    for backend in BACKENDS:
        dk.dispatch(r.expert_ids, 64, block_m=64, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        r = dk.route(torch.randn(4096, 64, device=device), top_p=0.7, k_max=6)
        plans = [dk.dispatch(r.expert_ids, 64, block_m=64, tokens_per_expert=r.tokens_per_expert, backend=b)
                 for b in BACKENDS]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for plan in plans:
        _check_plan(r.expert_ids, 64, 64, plan)
