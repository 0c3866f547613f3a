"""The package's layers, checked on its source with `ast` (docs/design.md, "Layers of the code").

Rules:

* The core (every module of `sparse_adamw` outside `sparse_adamw.pipeline`) imports only torch, triton, the
  standard library and other core modules: not transformers, datasets or accelerate, not the pipeline, not any
  other third-party package, except the exceptions listed in ALLOWED_EXCEPTIONS with their reasons.
* A kernel module (anything under `sparse_adamw/triton_kernels/`) is a leaf: it imports only torch, triton, the
  standard library and the specification, `sparse_adamw.reference`.
* The import graph of the package's modules has no cycle.

What counts as an import: every `import` and `from ... import` statement, at module level or inside a function or
class, relative ones resolved against the importing module's package; and `importlib.import_module("...")` and
`__import__("...")` with a literal name (and a literal or `__name__`/`__package__` anchor for relative names).

One stricter check goes beyond that, in its own test (test_dynamic_import_tables_keep_the_rules): in a module that
calls `importlib.import_module` with a computed name (the backend table of `sparse_adamw.backends`), every string
constant in a dict, list, tuple or set literal, or assigned directly, that names one of the package's modules is
taken as an import too ("table" imports). A backend module that imports from the selection module which loads it
through such a table closes a cycle that only this test sees.

Edges of the graph: `import a.b.c` is an edge to a.b.c (a package: its __init__); `from pkg import name` is an edge
to pkg.name where that is a module, else to pkg (its __init__). So `from .. import __version__` in a subpackage's
module is an edge to the package's __init__. The parent packages that Python imports on the way are not edges
(every submodule would otherwise close a cycle with an __init__ that imports it). Targets that have no source file
in the package (the compiled extension `sparse_adamw._C`) are not nodes.

The checker is a few pure functions (collect_imports -> build_graph -> find_cycles / layer_violations); the negative
controls run it on small fake packages written into tmp_path.
"""
from __future__ import annotations

import ast
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "sparse_adamw"

# Third-party packages that the core and the kernels may import.
CORE_THIRD_PARTY = frozenset({"torch", "triton"})
# Named explicitly although the rule above already refuses them: the pipeline's dependencies.
PIPELINE_ONLY = frozenset({"transformers", "datasets", "accelerate"})
PIPELINE = "pipeline"  # the subpackage that may import them
KERNELS = "triton_kernels"  # the subpackage of leaves
SPEC = "reference"  # the one core module that kernels may import

# (importing module, imported top-level package) -> why it is allowed. Module names are relative to the package.
ALLOWED_EXCEPTIONS: Dict[Tuple[str, str], str] = {
    ("backends.build", "ninja"): "optional, inside a try: locates the ninja binary of the `ninja` wheel for "
                                 "torch.utils.cpp_extension when the venv's bin is not on PATH",
}


# --------------------------------------------------------------------------------------------------- the checker
@dataclass(frozen=True)
class Import:
    """One import in module `module`: of module `base` (absolute), or of `names` from it for `from base import`."""

    module: str
    base: str
    names: Tuple[str, ...]
    line: int
    text: str  # the statement as written, for messages
    kind: str = "statement"  # "statement", "import_module" (a literal name) or "table" (see the module docstring)


def discover_modules(package_dir: Path) -> Dict[str, Path]:
    """Module name -> source file for every .py file of the package (a package's name maps to its __init__.py)."""
    root = package_dir.parent
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve_relative(name: str, level: int, module: str, is_package: bool) -> Optional[str]:
    """Absolute name of `from <level dots><name> import`, in `module`; None if it climbs above the top level."""
    if level == 0:
        return name
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(anchor) - 1:
        return None
    anchor = anchor[: len(anchor) - (level - 1)]
    return ".".join(anchor + ([name] if name else []))


def _resolve_dynamic(name: str, anchor: Optional[str]) -> Optional[str]:
    """importlib.import_module(name, package=anchor)'s absolute name (importlib.util.resolve_name's rule)."""
    if not name.startswith("."):
        return name
    if not anchor:
        return None
    level = len(name) - len(name.lstrip("."))
    bits = anchor.rsplit(".", level - 1)
    if len(bits) < level:
        return None
    rest = name[level:]
    return f"{bits[0]}.{rest}" if rest else bits[0]


def _is_import_module_call(node: ast.Call, aliases: Set[str]) -> bool:
    """importlib.import_module(...), import_module(...) imported from importlib, or __import__(...)."""
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module" and isinstance(func.value, ast.Name) and func.value.id == "importlib"
    return isinstance(func, ast.Name) and (func.id == "__import__" or func.id in aliases)


def collect_imports(path: Path, module: str, known_modules: Iterable[str] = ()) -> List[Import]:
    """Every import of the file at `path`, which is module `module` (see the module docstring for what counts).

    `known_modules` (the package's module names) is used only where the module calls importlib.import_module with a
    computed name: table constants that name one of them become imports of kind "table".
    """
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    is_package = _is_package(path)
    own_package = module if is_package else module.rpartition(".")[0]
    found: List[Import] = []

    def text(node: ast.AST) -> str:
        return " ".join((ast.get_source_segment(source, node) or "").split())

    aliases = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "importlib"
               for a in n.names if a.name == "import_module"}
    computed_import = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, (), node.lineno, text(node)))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(node.module or "", node.level, module, is_package)
            if base is None:
                raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
            if base == "__future__":
                continue
            found.append(Import(module, base, tuple(a.name for a in node.names), node.lineno, text(node)))
        elif isinstance(node, ast.Call) and _is_import_module_call(node, aliases) and node.args:
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                computed_import = True
                continue
            anchor_node = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "package"), None)
            anchor = None
            if isinstance(anchor_node, ast.Constant) and isinstance(anchor_node.value, str):
                anchor = anchor_node.value
            elif isinstance(anchor_node, ast.Name) and anchor_node.id == "__package__":
                anchor = own_package
            elif isinstance(anchor_node, ast.Name) and anchor_node.id == "__name__":
                anchor = module
            target = _resolve_dynamic(first.value, anchor)
            if target is not None:
                found.append(Import(module, target, (), node.lineno, text(node), "import_module"))
    if computed_import:
        known = set(known_modules)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Dict, ast.List, ast.Tuple, ast.Set)):
                candidates = [*getattr(node, "keys", ()), *getattr(node, "values", ()), *getattr(node, "elts", ())]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                candidates = [node.value]
            else:
                continue
            for const in candidates:
                if isinstance(const, ast.Constant) and isinstance(const.value, str) and const.value in known \
                        and const.value != module:
                    found.append(Import(module, const.value, (), const.lineno,
                                        f"{const.value!r}, a table entry for a computed importlib.import_module",
                                        "table"))
    return sorted(found, key=lambda imp: (imp.line, imp.base, imp.names))


def import_targets(imp: Import, modules: Iterable[str]) -> List[str]:
    """The modules an import reaches: `from base import name` reaches base.name where that is a module, else base."""
    modules = set(modules)
    if not imp.names:
        return [imp.base]
    targets = []
    for name in imp.names:
        target = f"{imp.base}.{name}" if f"{imp.base}.{name}" in modules else imp.base
        if target not in targets:
            targets.append(target)
    return targets


def collect_package_imports(package_dir: Path, tables: bool = False) -> Tuple[Dict[str, Path], List[Import]]:
    """The package's modules and all their imports ("table" imports only with `tables`)."""
    modules = discover_modules(package_dir)
    imports = [imp for name, path in modules.items() for imp in collect_imports(path, name, modules)
               if tables or imp.kind != "table"]
    return modules, imports


def build_graph(imports: Iterable[Import], modules: Iterable[str]) -> Dict[str, Set[str]]:
    """module -> the package's modules it imports (no self-loops; targets without a source file are left out)."""
    modules = set(modules)
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for imp in imports:
        for target in import_targets(imp, modules):
            if target in modules and target != imp.module:
                graph[imp.module].add(target)
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle, as [a, b, ..., a], for every strongly connected component of more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[Set[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    def shortest_path(source: str, target: str, within: Set[str]) -> List[str]:
        """Breadth first; `target` is reachable because source and target share a component."""
        parent: Dict[str, Optional[str]] = {source: None}
        frontier = [source]
        while target not in parent:
            next_frontier = []
            for v in frontier:
                for w in sorted(graph[v] & within):
                    if w not in parent:
                        parent[w] = v
                        next_frontier.append(w)
            frontier = next_frontier
        path = [target]
        while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
        return path[::-1]

    # Per component, through its first module: one shortest cycle for each of that module's edges into the
    # component (a selection module and the implementations that import it back each show up).
    cycles = []
    for component in components:
        start = min(component)
        for first in sorted(graph[start] & component):
            cycle = [start] + shortest_path(first, start, component)
            if cycle not in cycles:
                cycles.append(cycle)
    return sorted(cycles)


def _relative(module: str, package: str) -> str:
    return module[len(package) + 1:] if module.startswith(package + ".") else ""


def layer_violations(imports: Iterable[Import], modules: Iterable[str], package: str) -> List[str]:
    """Messages for the core and kernel rules broken by `imports` (of the package named `package`)."""
    modules = set(modules)
    pipeline = f"{package}.{PIPELINE}"
    kernels = f"{package}.{KERNELS}"
    spec = f"{package}.{SPEC}"
    messages = []
    for imp in imports:
        rel = _relative(imp.module, package)
        in_pipeline = imp.module == pipeline or imp.module.startswith(pipeline + ".")
        in_kernels = imp.module == kernels or imp.module.startswith(kernels + ".")
        if in_pipeline:
            continue
        where = f"{imp.module} (line {imp.line}: `{imp.text}`)"
        top = imp.base.split(".")[0]
        for target in import_targets(imp, modules):
            internal = top == package
            if internal and (target == pipeline or target.startswith(pipeline + ".")):
                messages.append(f"core module {where} imports the pipeline module {target}")
            elif top in PIPELINE_ONLY:
                messages.append(f"core module {where} imports {top}, a pipeline dependency")
            elif not internal and top not in CORE_THIRD_PARTY and top not in sys.stdlib_module_names \
                    and (rel, top) not in ALLOWED_EXCEPTIONS:
                messages.append(f"core module {where} imports the third-party package {top} "
                                "(the core may import only torch, triton and the standard library)")
            if not in_kernels:
                continue
            if internal and target != spec or not internal and top not in CORE_THIRD_PARTY \
                    and top not in sys.stdlib_module_names:  # no exceptions for kernels
                messages.append(f"kernel module {where} imports {target}: kernels import only torch, triton, "
                                f"the standard library and the specification {spec}")
    return sorted(set(messages))


def check_package(package_dir: Path, tables: bool = False) -> Tuple[List[str], List[List[str]]]:
    """(layer violations, import cycles) of the package in `package_dir` ("table" imports only with `tables`)."""
    modules, imports = collect_package_imports(package_dir, tables)
    return layer_violations(imports, modules, package_dir.name), find_cycles(build_graph(imports, modules))


# -------------------------------------------------------------------------------------------- the real package
@pytest.fixture(scope="module")
def package():
    return collect_package_imports(PACKAGE_DIR)


def test_walker_sees_the_package(package):
    """Guards the other tests against passing vacuously: the walk finds every layer and its imports."""
    modules, imports = package
    for name in ("sparse_adamw", "sparse_adamw.optimizer", "sparse_adamw.reference", "sparse_adamw.backends",
                 "sparse_adamw.triton_kernels.sparse_adamw", "sparse_adamw.pipeline.trainer"):
        assert name in modules, f"{name} not found under {PACKAGE_DIR}"
    edges = build_graph(imports, modules)
    assert "sparse_adamw.optimizer" in edges["sparse_adamw"]
    assert "sparse_adamw.optimizer" in edges["sparse_adamw.pipeline.trainer"]


def test_core_imports_only_torch_triton_and_the_standard_library(package):
    modules, imports = package
    messages = [m for m in layer_violations(imports, modules, "sparse_adamw") if m.startswith("core")]
    assert not messages, "the core must not depend on the pipeline or other packages:\n" + "\n".join(messages)


def test_kernels_are_leaves(package):
    modules, imports = package
    messages = [m for m in layer_violations(imports, modules, "sparse_adamw") if m.startswith("kernel")]
    assert not messages, "kernel modules must be leaves:\n" + "\n".join(messages)


def test_import_graph_has_no_cycle(package):
    modules, imports = package
    cycles = find_cycles(build_graph(imports, modules))
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_dynamic_import_tables_keep_the_rules():
    """The stricter check: modules named in a table for a computed importlib.import_module count as imports."""
    violations, cycles = check_package(PACKAGE_DIR, tables=True)
    assert not violations and not cycles, "with the modules of dynamic import tables as imports:\n" + "\n".join(
        violations + [" -> ".join(c) for c in cycles])


def test_allowed_exceptions_exist(package):
    """Every listed exception names a real module that really makes that import (no stale entries)."""
    modules, imports = package
    made = {(_relative(imp.module, "sparse_adamw"), imp.base.split(".")[0]) for imp in imports}
    for (module, top), reason in ALLOWED_EXCEPTIONS.items():
        assert reason
        assert f"sparse_adamw.{module}" in modules, f"ALLOWED_EXCEPTIONS names a missing module {module}"
        assert (module, top) in made, f"ALLOWED_EXCEPTIONS: {module} no longer imports {top}; drop the entry"


# --------------------------------------------------------------------------------- the checker's own behaviour
def _write_package(root: Path, files: Dict[str, str]) -> Path:
    """Write {relative path: source} under root/sparse_adamw (every directory gets an __init__.py)."""
    package_dir = root / "sparse_adamw"
    for rel, source in files.items():
        path = package_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
    for directory in [package_dir, *[p for p in package_dir.rglob("*") if p.is_dir()]]:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text("", encoding="utf-8")
    return package_dir


CLEAN = {
    "__init__.py": "from .optimizer import SparseAdamW\n__version__ = '0'\n",
    "masks.py": "import math\nimport torch\n",
    "reference.py": "from .masks import math\n",
    "optimizer.py": """\
        import importlib
        import torch
        from .backends import select

        def load():
            return importlib.import_module("sparse_adamw.triton_kernels.kernel")
        """,
    "backends/__init__.py": "def select():\n    from . import build\n",
    "backends/build.py": "def find():\n    import ninja\n",
    "triton_kernels/kernel.py": "import triton\nimport triton.language as tl\nfrom ..reference import math\n",
    "pipeline/cli.py": "import transformers\nfrom .. import __version__\nfrom ..optimizer import SparseAdamW\n",
}


def test_clean_fake_package_passes(tmp_path):
    """Positive control: the allowed imports (ninja in backends/build.py included) report nothing."""
    violations, cycles = check_package(_write_package(tmp_path, CLEAN))
    assert violations == [] and cycles == []


def test_collect_imports_sees_every_form(tmp_path):
    package_dir = _write_package(tmp_path, {"backends/impl.py": """\
        import os.path
        import importlib
        from importlib import import_module
        from importlib import import_module as load
        from . import build
        from .. import layout, __version__
        from ..masks import grid

        def later():
            import transformers

        class Lazy:
            def method(self):
                importlib.import_module("sparse_adamw.reference")
                import_module(".torch_impl", __package__)
                load(".build", package="sparse_adamw.backends")
                __import__("datasets")
        """})
    for name in ("build", "torch_impl"):
        (package_dir / "backends" / f"{name}.py").write_text("", encoding="utf-8")
    for name in ("layout", "masks", "reference"):
        (package_dir / f"{name}.py").write_text("", encoding="utf-8")
    modules = discover_modules(package_dir)
    imports = collect_imports(package_dir / "backends" / "impl.py", "sparse_adamw.backends.impl", modules)
    targets = {t for imp in imports for t in import_targets(imp, modules)}
    assert targets == {"os.path", "importlib", "sparse_adamw.backends.build", "sparse_adamw.layout", "sparse_adamw",
                       "sparse_adamw.masks", "transformers", "sparse_adamw.reference",
                       "sparse_adamw.backends.torch_impl", "datasets"}


def test_computed_import_module_names_count(tmp_path):
    """A backend table of module names, loaded with importlib.import_module(table[name]), gives edges."""
    package_dir = _write_package(tmp_path, {
        "backends/__init__.py": """\
            import importlib
            _MODULES = {"torch": "sparse_adamw.backends.torch_impl"}

            def load(name):
                return importlib.import_module(_MODULES[name])
            """,
        "backends/torch_impl.py": "from . import load\n",
    })
    assert check_package(package_dir) == ([], [])
    violations, cycles = check_package(package_dir, tables=True)
    assert cycles == [["sparse_adamw.backends", "sparse_adamw.backends.torch_impl", "sparse_adamw.backends"]]


def test_negative_control_core_imports_transformers(tmp_path):
    files = dict(CLEAN, **{"sparsity.py": "def f():\n    from transformers import PreTrainedModel\n"})
    violations, _ = check_package(_write_package(tmp_path, files))
    assert len(violations) == 1
    assert "core module sparse_adamw.sparsity" in violations[0] and "transformers" in violations[0]


def test_negative_control_core_imports_the_pipeline_or_other_packages(tmp_path):
    files = dict(CLEAN, **{
        "masks.py": "import numpy\nimport torch\n",
        "layout.py": "from .pipeline import cli\n",
        "dtensor.py": "import importlib\nimportlib.import_module('sparse_adamw.pipeline.cli')\n",
        "sparsity.py": "import ninja\n",  # the exception is for backends/build.py only
    })
    violations = "\n".join(check_package(_write_package(tmp_path, files))[0])
    assert "core module sparse_adamw.masks" in violations and "third-party package numpy" in violations
    assert "core module sparse_adamw.layout" in violations and "pipeline module sparse_adamw.pipeline.cli" in violations
    assert "core module sparse_adamw.dtensor" in violations
    assert "core module sparse_adamw.sparsity" in violations and "ninja" in violations


def test_negative_control_kernel_imports_the_optimizer(tmp_path):
    files = dict(CLEAN, **{"triton_kernels/kernel.py": "import triton\nfrom ..optimizer import SparseAdamW\n"})
    violations, _ = check_package(_write_package(tmp_path, files))
    assert len(violations) == 1
    assert "kernel module sparse_adamw.triton_kernels.kernel" in violations[0]
    assert "sparse_adamw.optimizer" in violations[0]


def test_negative_control_kernel_imports_a_package_init(tmp_path):
    files = dict(CLEAN, **{"triton_kernels/kernel.py": "import torch\nfrom ..backends import select\n"})
    violations, _ = check_package(_write_package(tmp_path, files))
    assert len(violations) == 1
    assert violations[0].startswith("kernel module sparse_adamw.triton_kernels.kernel")
    assert "imports sparse_adamw.backends:" in violations[0]


def test_negative_control_cycle_through_function_level_imports(tmp_path):
    files = dict(CLEAN, **{
        "masks.py": "def f():\n    from . import layout\n",
        "layout.py": "def g():\n    from .masks import f\n",
    })
    _, cycles = check_package(_write_package(tmp_path, files))
    assert cycles == [["sparse_adamw.layout", "sparse_adamw.masks", "sparse_adamw.layout"]]


def test_negative_control_cycle_through_a_package_init(tmp_path):
    """`from .. import __version__` in a submodule is an edge to the package's __init__."""
    files = dict(CLEAN, **{"optimizer.py": "from .backends import select\n",
                           "backends/__init__.py": "from .. import __version__\ndef select():\n    pass\n"})
    _, cycles = check_package(_write_package(tmp_path, files))
    assert cycles == [["sparse_adamw", "sparse_adamw.optimizer", "sparse_adamw.backends", "sparse_adamw"]]
