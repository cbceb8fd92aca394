"""The MoE package is layered one way (read from the source with ``ast``, nothing imported).

Bottom to top: the host modules (``types``: the result types and plan sizes; ``configs``:
tile sizes and the autotuner); the kernels and their launchers (``routing``, ``dispatch``,
``grouped_gemm``, ``combine``) beside the ``backend="torch"`` modules (``dispatch_torch``,
``routing_torch``, then ``experts_torch``, which walks the torch-built plan); ``ops`` (the
``torch.library`` custom ops); ``interface`` (the public API, which composes the ops); the
package ``__init__``. A module may import only modules of a strictly lower layer, at
module level (no function-level import hiding a cycle), with one exception: ``ops``
imports the kernel modules inside the op implementations, so that importing the package
decorates no Triton kernel. The torch backend never imports a kernel module, and no MoE
module imports the oracle ``dasg_kernels.reference``.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PKG = os.path.join(ROOT, "dasg_kernels")
MOE = os.path.join(PKG, "moe")

LAYERS = {
    "types": 0,
    "configs": 0,
    "routing": 1,
    "dispatch": 1,
    "grouped_gemm": 1,
    "combine": 1,
    "dispatch_torch": 1,
    "routing_torch": 1,
    "experts_torch": 2,
    "ops": 3,
    "interface": 4,
    "__init__": 5,
}
KERNELS = {"routing", "dispatch", "grouped_gemm", "combine"}
TORCH_BACKEND = {"dispatch_torch", "routing_torch", "experts_torch"}
# the one module that imports kernel modules lazily, inside functions
LAZY_KERNEL_IMPORTS = "ops"
# modules of dasg_kernels outside moe/ that moe/ may use; they may reach back into moe/
# only for moe.types (the bottom layer)
OUTSIDE_ALLOWED = {"dasg_kernels.backend", "dasg_kernels.validation"}
# modules outside moe/ that may import moe.types and nothing else of moe/
OUTSIDE_CHECKED = OUTSIDE_ALLOWED | {"dasg_kernels.reference"}


def _moe_modules():
    return sorted(f[:-3] for f in os.listdir(MOE) if f.endswith(".py"))


def _parse(path):
    with open(path) as f:
        return ast.parse(f.read(), filename=path)


def _is_package_module(dotted):
    rel = dotted.split(".")[1:]
    base = os.path.join(PKG, *rel)
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def _imports(tree):
    """``(dotted module, node, at module level)`` for every dasg_kernels import in ``tree``.

    ``from dasg_kernels.moe import ops`` names the submodule ``dasg_kernels.moe.ops``;
    ``from dasg_kernels.moe import Routing`` names the package (``__init__``) itself."""
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"relative import at line {node.lineno}: use absolute dasg_kernels imports")
            mod = node.module or ""
            names = []
            for a in node.names:
                sub = f"{mod}.{a.name}"
                names.append(sub if sub.startswith("dasg_kernels") and _is_package_module(sub) else mod)
        else:
            continue
        for name in names:
            if name == "dasg_kernels" or name.startswith("dasg_kernels."):
                out.append((name, node, id(node) in top))
    return out


def _moe_name(dotted):
    """``dasg_kernels.moe.X`` -> ``X`` (``dasg_kernels.moe`` -> ``__init__``), else None."""
    if dotted == "dasg_kernels.moe":
        return "__init__"
    if dotted.startswith("dasg_kernels.moe."):
        return dotted.split(".")[2]
    return None


def test_every_moe_module_has_a_layer():
    assert set(_moe_modules()) == set(LAYERS), "place new moe modules in LAYERS"


@pytest.mark.parametrize("mod", _moe_modules())
def test_moe_module_imports_only_downwards(mod):
    tree = _parse(os.path.join(MOE, mod + ".py"))
    for dotted, node, at_top in _imports(tree):
        where = f"dasg_kernels/moe/{mod}.py:{node.lineno} imports {dotted}"
        target = _moe_name(dotted)
        if not at_top:
            assert mod == LAZY_KERNEL_IMPORTS and target in KERNELS, (
                f"{where} inside a function or block: import it at module level")
        if target is None:
            assert dotted in OUTSIDE_ALLOWED, f"{where}: not one of {sorted(OUTSIDE_ALLOWED)}"
            continue
        assert target in LAYERS, where
        assert LAYERS[target] < LAYERS[mod], (
            f"{where}: layer {LAYERS[target]} ({target}) is not below layer {LAYERS[mod]} ({mod})")
        assert not (mod in TORCH_BACKEND and target in KERNELS), f"{where}: the torch backend imports no kernel"
        assert not (mod in KERNELS and target in TORCH_BACKEND), f"{where}: a kernel module imports the torch backend"


@pytest.mark.parametrize("mod", ["interface", "__init__"])
def test_interface_imports_no_kernel_module(mod):
    for dotted, node, _ in _imports(_parse(os.path.join(MOE, mod + ".py"))):
        assert _moe_name(dotted) not in KERNELS, f"dasg_kernels/moe/{mod}.py:{node.lineno} imports {dotted}"


@pytest.mark.parametrize("dotted", sorted(OUTSIDE_CHECKED))
def test_outside_helpers_do_not_reach_up_into_moe(dotted):
    path = os.path.join(PKG, *dotted.split(".")[1:]) + ".py"
    for imported, node, _ in _imports(_parse(path)):
        target = _moe_name(imported)
        assert target in (None, "types"), f"{path}:{node.lineno} imports {imported}"
        if target is None and imported != "dasg_kernels":
            assert imported in OUTSIDE_ALLOWED, f"{path}:{node.lineno} imports {imported}"


def test_layer_checker_sees_a_function_level_cycle():
    # the checker itself: the pattern this file exists to forbid is found
    src = "def f():\n    from dasg_kernels.moe import ops\n    return ops\n"
    (dotted, node, at_top), = _imports(ast.parse(src))
    assert dotted == "dasg_kernels.moe.ops" and not at_top
    (dotted, _, at_top), = _imports(ast.parse("from dasg_kernels.moe import Routing\n"))
    assert dotted == "dasg_kernels.moe" and at_top
