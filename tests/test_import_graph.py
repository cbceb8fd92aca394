"""The packages are layered one way: read from the source with ``ast`` (nothing imported,
except in the last test, which checks what importing the oracle loads).

Layers of ``dasg_kernels``, bottom to top (DESIGN.md, "Layout"):

0. host modules: no ``@triton.jit`` in them (validators, configs, backend selection, the
   PyTorch attention core, the MoE torch backend, plain types);
1. kernel modules: ``@triton.jit`` code and its launchers;
2. custom ops (``attention/ops.py``, ``moe/ops.py``): ``torch.library`` ops, fake impls,
   autograd;
3. public interface: the ``interface`` modules, ``varlen``, ``kvcache``, context
   parallelism, the package ``__init__`` files.

A module imports only modules of its own layer or below (function-level imports count:
they are how the custom-op layer loads its kernels lazily). ``reference.py`` is the
oracle: it imports host modules only, and no package module imports it. No module imports
another module's private name. ``dasg_kernels`` never imports ``dasg_model`` (nor
transformers); neither package imports ``benchmarks``; no import cycle in either package.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dasg_kernels", "dasg_model")
OPS = {"dasg_kernels.attention.ops", "dasg_kernels.moe.ops"}
INTERFACE_NAMES = {"interface", "varlen", "kvcache", "context_parallel", "distributed", "__init__"}
LAYER_NAMES = {0: "host", 1: "kernel", 2: "custom-op", 3: "interface"}


def _modules(package: str) -> dict[str, str]:
    """``dotted name -> path`` of every module of ``package`` (``__init__`` as the package)."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if not f.endswith(".py"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join(rel)] = os.path.join(dirpath, f)
    return out


MODULES = {name: path for pkg in PACKAGES for name, path in _modules(pkg).items()}
TREES = {name: ast.parse(open(path).read(), filename=path) for name, path in MODULES.items()}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].endswith("__init__.py"):
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> Iterator[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import in ``module``;
    ``from pkg import sub`` yields the submodule ``pkg.sub``."""
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:
                    yield sub, None, node.lineno
                else:
                    yield target, a.name, node.lineno


def _internal(target: str) -> str | None:
    """The package module ``target`` names (its longest known prefix), else None."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in MODULES:
            return name
        parts.pop()
    return None


def _has_jit(module: str) -> bool:
    for node in ast.walk(TREES[module]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                d = d.func if isinstance(d, ast.Call) else d
                if isinstance(d, ast.Attribute) and d.attr in ("jit", "autotune", "heuristics"):
                    return True
    return False


def _top_level_targets(module: str) -> Iterator[str]:
    top = set(map(id, TREES[module].body))
    for target, _, line in _imports(module):
        dst = _internal(target)
        if dst is not None and any(getattr(n, "lineno", None) == line and id(n) in top for n in TREES[module].body):
            yield dst


def layer(module: str) -> int:
    """The layer of a ``dasg_kernels`` module (module docstring). A launcher without jit
    code of its own (it imports a kernel module at module level) is a kernel module; a
    torch backend (``blockwise``, ``*_torch``) is a host module by definition, so one that
    imported a kernel module would be reported."""
    if module in OPS:
        return 2
    if module.split(".")[-1] in INTERFACE_NAMES or module in ("dasg_kernels", "dasg_kernels.attention",
                                                               "dasg_kernels.moe"):
        return 3
    if _has_jit(module):
        return 1
    if module.endswith((".blockwise", "_torch")):
        return 0
    return 1 if any(d != module and _has_jit(d) for d in _top_level_targets(module)) else 0


def _edges(package: str) -> Iterator[tuple[str, str, str | None, int]]:
    for module in MODULES:
        if module.split(".")[0] != package:
            continue
        for target, name, line in _imports(module):
            dst = _internal(target)
            if dst is not None and dst != module:
                yield module, dst, name, line


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    graph: dict[str, set[str]] = {}
    for src, dst, _, _ in _edges(package):
        if dst.split(".")[0] == package:
            graph.setdefault(src, set()).add(dst)
    # a package's __init__ re-exporting its submodules is the one sanctioned back edge:
    # importing a submodule runs the package __init__ first, never the reverse
    for src in graph:
        graph[src] = {d for d in graph[src] if not src.startswith(d + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_kernels_layers_one_way():
    bad = []
    for src, dst, _, line in _edges("dasg_kernels"):
        if dst.startswith("dasg_kernels") and dst != "dasg_kernels.reference" and not src.startswith(dst + "."):
            if layer(dst) > layer(src):
                bad.append(f"{MODULES[src]}:{line}: {LAYER_NAMES[layer(src)]} module {src} imports "
                           f"{LAYER_NAMES[layer(dst)]} module {dst}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_reference_is_only_an_oracle():
    bad = [f"{MODULES[src]}:{line}: {src} imports the oracle"
           for pkg in PACKAGES for src, dst, _, line in _edges(pkg)
           if dst == "dasg_kernels.reference" and src != "dasg_kernels"]
    bad += [f"reference.py:{line} imports {dst} (layer {layer(dst)})"
            for src, dst, _, line in _edges("dasg_kernels")
            if src == "dasg_kernels.reference" and not (dst.startswith("dasg_kernels.") and layer(dst) == 0)
            and dst != "dasg_kernels"]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_names_across_modules(package):
    bad = [f"{MODULES[src]}:{line}: from {dst} import {name}"
           for src, dst, name, line in _edges(package)
           if name is not None and name.startswith("_") and not name.startswith("__")]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_floors():
    bad = []
    for module in MODULES:
        pkg = module.split(".")[0]
        for target, _, line in _imports(module):
            top = target.split(".")[0]
            if top == "benchmarks" or (pkg == "dasg_kernels" and top in ("dasg_model", "transformers")):
                bad.append(f"{MODULES[module]}:{line}: {module} imports {target}")
    assert not bad, "\n".join(bad)


def test_importing_the_oracle_loads_no_kernel():
    """``import dasg_kernels.reference`` (which runs the package ``__init__``) imports no
    module that defines a Triton kernel: the kernels load when a Triton path first runs."""
    code = "import sys, dasg_kernels.reference; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded = [m for m in out.stdout.split() if m in MODULES and m.startswith("dasg_kernels")]
    kernels = [m for m in loaded if _has_jit(m)]
    assert not kernels, f"importing dasg_kernels.reference loaded kernel modules {kernels}"
    assert "dasg_kernels.reference" in loaded


def test_the_checks_see_what_they_check():
    """The classification is not vacuous: the kernel modules are found as such, the ops and
    interfaces too, and the graph has edges."""
    kernels = {m for m in MODULES if m.startswith("dasg_kernels") and layer(m) == 1}
    assert {"dasg_kernels.attention.fwd", "dasg_kernels.attention.bwd", "dasg_kernels.moe.grouped_gemm"} <= kernels
    assert layer("dasg_kernels.attention.interface") == 3 and layer("dasg_kernels.moe.ops") == 2
    assert layer("dasg_kernels.backend") == 0
    assert sum(1 for _ in _edges("dasg_kernels")) > 30 and sum(1 for _ in _edges("dasg_model")) > 20
