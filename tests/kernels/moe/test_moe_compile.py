"""torch.compile and torch.library checks of the MoE custom ops (``torch.ops.dasg_kernels.moe_*``),
and of the ``backend="torch"`` path.

The Triton launches are opaque custom ops with fake implementations, so
``torch.compile`` traces ``expert_ffn`` / ``moe_ffn`` around them (on the CPU the
interpreter runs the kernels at run time; the only graph break is the CPU-only range
check of the expert ids, which reads them back) and the compiled result is bitwise
the eager one.

The torch path (what ``backend="auto"`` runs on a CPU without ``TRITON_INTERPRET``) has
static shapes: one graph, with ``fullgraph=False`` too (a data-dependent op such as
``nonzero`` would split it), and no unbacked size (``fullgraph=True`` would capture such
an op with a data-dependent size and runtime asserts instead of breaking).
"""
import pytest
import torch
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

import dasg_kernels as dk
from dasg_kernels.moe import ops  # noqa: F401  (registers the ops)
from dasg_kernels.moe.experts_torch import choose_method


@pytest.fixture(autouse=True)
def _one_config(monkeypatch):
    monkeypatch.setenv("DASG_AUTOTUNE", "0")  # on the GPU: one config per kernel, no autotuning


def _problem(device, n=12, d=16, f=16, e=4, k=2, dtype=torch.float32):
    x = torch.randn(n, d, device=device).to(dtype)
    w1 = (torch.randn(e, 2 * f, d, device=device) / d ** 0.5).to(dtype)
    w2 = (torch.randn(e, d, f, device=device) / f ** 0.5).to(dtype)
    ids = torch.argsort(torch.rand(n, e, device=device), dim=-1)[:, :k].int()
    ids[::3, -1] = -1
    wt = torch.where(ids >= 0, torch.rand(n, k, device=device) + 0.1, torch.zeros(n, k, device=device))
    return x, w1, w2, ids, wt


def _fwd_bwd(fn, x, w1, w2, ids, wt, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2, wt)]
    y = fn(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def _recording(graphs, inner):
    """A torch.compile backend that appends each captured graph to ``graphs`` and compiles
    it with the ``inner`` backend."""
    from torch._dynamo.backends.registry import lookup_backend

    compile_fn = lookup_backend(inner)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fn(gm, example_inputs)

    return backend


def _recording_inductor(graphs):
    return _recording(graphs, "inductor")


def _unbacked(graphs):
    """Nodes of the captured graphs whose value has a data-dependent (unbacked) size."""
    bad = []
    for gm in graphs:
        for node in gm.graph.nodes:
            val = node.meta.get("example_value")
            for v in val if isinstance(val, (tuple, list)) else [val]:
                if isinstance(v, (torch.Tensor, torch.SymInt)) and free_unbacked_symbols(v):
                    bad.append(f"{node.op} {node.target}")
    return bad


def _targets(graphs):
    return {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}


def test_expert_ffn_torch_compile_matches_eager(device):
    torch._dynamo.reset()
    x, w1, w2, ids, wt = _problem(device)
    dy = torch.randn_like(x)

    def fn(x, w1, w2, ids, wt):
        return dk.expert_ffn(x, w1, w2, (ids, wt), backend="triton")

    graphs = []
    compiled = torch.compile(fn, backend=_recording_inductor(graphs), fullgraph=False)
    got = _fwd_bwd(compiled, x, w1, w2, ids, wt, dy)
    want = _fwd_bwd(fn, x, w1, w2, ids, wt, dy)
    for name, a, b in zip(["y", "dx", "d_gate_up_proj", "d_down_proj", "d_weights"], got, want):
        assert torch.equal(a, b), name
    # the launches are ops inside the captured graphs, not breaks between them
    targets = _targets(graphs)
    assert any("moe_dispatch" in t for t in targets), targets
    assert any("moe_expert_ffn_fwd" in t for t in targets), targets


def test_moe_ffn_torch_compile_matches_eager(device):
    torch._dynamo.reset()
    n, d, f, e = 10, 16, 16, 8
    x = torch.randn(n, d, device=device)
    router = torch.randn(e, d, device=device) / d ** 0.5
    _, w1, w2, _, _ = _problem(device, n=n, d=d, f=f, e=e)
    kw = dict(top_p=0.7, k_max=3, n_group=4, topk_group=2, backend="triton")

    def fn(x, router):
        return dk.moe_ffn(x, router, w1, w2, **kw)

    graphs = []
    compiled = torch.compile(fn, backend=_recording_inductor(graphs), fullgraph=False)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    (y, r), (y_ref, r_ref) = compiled(xs[0], router), fn(xs[1], router)
    assert torch.equal(r.expert_ids, r_ref.expert_ids) and torch.equal(r.tokens_per_expert, r_ref.tokens_per_expert)
    # the router's softmax / linear may be fused by inductor: equal up to rounding
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, xs[0], dy)[0], torch.autograd.grad(y_ref, xs[1], dy)[0],
                               rtol=1e-5, atol=1e-6)
    targets = _targets(graphs)
    for op in ("moe_route_select", "moe_dispatch", "moe_expert_ffn_fwd"):
        assert any(op in t for t in targets), (op, targets)


def test_moe_custom_ops_opcheck(device):
    # schema (no mutation, no aliasing), fake tensors (static and dynamic shapes),
    # autograd registration and AOT dispatch of every MoE custom op
    x, w1, w2, ids, wt = _problem(device, n=9, k=2)
    e = w1.shape[0]
    block_m = 16
    plan = dk.dispatch(ids, e, block_m=block_m, backend="triton")
    pt = (plan.row_pair, plan.pair_row, plan.expert_offsets, plan.tile_expert)
    probs = torch.softmax(torch.randn(9, 8, device=device), -1)
    torch.library.opcheck(torch.ops.dasg_kernels.moe_route_select.default, (probs, 0.7, 3, 3, 1, 4, 2))
    torch.library.opcheck(torch.ops.dasg_kernels.moe_dispatch.default, (ids, e, block_m))
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2, wt)]
    fwd = torch.ops.dasg_kernels.moe_expert_ffn_fwd.default
    # without saved gu every output is fully defined: all checks, the AOT one included (it
    # compares two runs and runs the backward, which reruns the gate/up GEMM)
    torch.library.opcheck(fwd, (*leaves, *pt, block_m, False))
    # with it, gu's padding rows are never written (nor read), so two runs may differ there
    torch.library.opcheck(fwd, (*leaves, *pt, block_m, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    _, gu = torch.ops.dasg_kernels.moe_expert_ffn_fwd(x, w1, w2, wt, *pt, block_m, True)
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.dasg_kernels.moe_expert_ffn_bwd.default,
                          (dy, x, w1, w2, wt, gu, *pt, block_m, True, True, True, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.dasg_kernels.moe_expert_ffn_bwd.default,
                          (dy, x, w1, w2, wt, gu.new_empty(0), *pt, block_m, False, True, False, True),
                          test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------- backend="torch"


def test_unbacked_check_sees_the_reference_nonzero():
    # the check the torch-path tests rely on: the reference's per-expert torch.where(ids == e)
    # is a data-dependent size under fullgraph=True (and a graph break without it)
    from dasg_kernels.reference import expert_ffn_ref

    torch._dynamo.reset()
    x, w1, w2, ids, wt = _problem("cpu", n=6, d=4, f=4, e=2, k=1)
    graphs = []
    torch.compile(expert_ffn_ref, fullgraph=True, backend=_recording(graphs, "eager"))(x, w1, w2, ids, wt)
    assert _unbacked(graphs)


# AOT autograd traces the forward and the backward (inductor's cold C++ builds would take
# half a minute on a CPU runner)
@pytest.mark.parametrize("n,e,method", [(12, 4, "dense"), (3, 64, "grouped")])
def test_expert_ffn_torch_backend_compiles_without_graph_break(device, n, e, method):
    torch._dynamo.reset()
    assert choose_method(n, 2, e)[0] == method
    x, w1, w2, ids, wt = _problem(device, n=n, d=10, f=20, e=e)  # sizes the Triton kernels lack
    ids[1] = -1  # a token routed nowhere
    dy = torch.randn_like(x)
    names = ["y", "dx", "d_gate_up_proj", "d_down_proj", "d_weights"]

    def fn(x, w1, w2, ids, wt):
        return dk.expert_ffn(x, w1, w2, (ids, wt), backend="torch")

    graphs = []
    compiled = torch.compile(fn, backend=_recording(graphs, "aot_eager"))  # fullgraph=False: a break shows as 2 graphs
    got = _fwd_bwd(compiled, x, w1, w2, ids, wt, dy)
    want = _fwd_bwd(fn, x, w1, w2, ids, wt, dy)
    assert len(graphs) == 1, [gm.code for gm in graphs]
    assert not _unbacked(graphs)
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # fullgraph with a symbolic batch size: one graph serves both sizes (shape guards only)
    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend=_recording(graphs, "eager"))
    for rows in (n, n - 1):
        xr, ids_r, wt_r, dy_r = (t[:rows].clone() for t in (x, ids, wt, dy))  # not views of one base
        got = _fwd_bwd(compiled, xr, w1, w2, ids_r, wt_r, dy_r)
        want = _fwd_bwd(fn, xr, w1, w2, ids_r, wt_r, dy_r)
        for name, a, b in zip(names, got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert len(graphs) == 1 and not _unbacked(graphs)


def test_moe_ffn_torch_backend_compiles_without_graph_break(device):
    # routing (top-p, k_max padding, groups) and experts in one graph: route_torch counts the
    # tokens per expert with a scatter-add, not bincount of a masked select
    torch._dynamo.reset()
    n, d, f, e = 10, 12, 20, 8
    x = torch.randn(n, d, device=device)
    router = torch.randn(e, d, device=device) / d ** 0.5
    _, w1, w2, _, _ = _problem(device, n=n, d=d, f=f, e=e)
    kw = dict(top_p=0.7, k_max=3, n_group=4, topk_group=2, backend="torch")

    def fn(x, router):
        y, r = dk.moe_ffn(x, router, w1, w2, **kw)
        return y, r.expert_ids, r.tokens_per_expert

    graphs = []
    compiled = torch.compile(fn, backend=_recording(graphs, "aot_eager"))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    (y, ids, counts), (y_ref, ids_ref, counts_ref) = compiled(xs[0], router), fn(xs[1], router)
    assert len(graphs) == 1 and not _unbacked(graphs)
    assert torch.equal(ids, ids_ref) and torch.equal(counts, counts_ref)
    assert (ids == -1).any()  # top-p left slots unused
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, xs[0], dy)[0], torch.autograd.grad(y_ref, xs[1], dy)[0],
                               rtol=1e-5, atol=1e-6)


def test_dasg_model_train_step_torch_backend_compiles_without_graph_break(device):
    # torch.compile(model) as users run it (fullgraph=False), backend="torch": DSSE (one-expert
    # banks, deep rows masked), ADR (top-p routing, deep-level masking), both routed banks
    from dasg_model import DASGConfig, DASGForCausalLM

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = DASGConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, attention_window=5,
                     group_size=4, shallow_shared_size=16, deep_shared_size=16, shallow_num_experts=4,
                     shallow_expert_size=16, deep_num_experts=8, deep_expert_size=16, top_p=0.6, k_max=2,
                     complexity_threshold=0.5, backend="torch")
    model = DASGForCausalLM(cfg).to(device).train()
    ids = torch.randint(1, 64, (2, 12), device=device)
    graphs = []
    compiled = torch.compile(lambda x: model(x, labels=x).loss, backend=_recording(graphs, "eager"))
    loss = compiled(ids)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert len(graphs) == 1 and not _unbacked(graphs)
    model.zero_grad()
    eager = model(ids, labels=ids).loss
    eager.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
