"""The package's shape, enforced: every import inside ``draftwise/`` (function-local ones included)
points to the same layer or one below it, and no modules import each other in a cycle. A new
module must be given a layer here: where it sits says what it may import."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "draftwise"

# lowest first; a module is in the layer of the longest prefix listed for it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "paths", "parts", "tree", "sampling", "corpora", "models.config", "models.layout",
                    "policies.guard")),
    ("numerics", ("quant", "kernels")),
    ("model", ("models",)),
    ("planning", ("policies", "vocab", "crossvocab", "datastore", "verify")),
    ("drafters", ("drafters",)),
    ("core", ("methods", "decoding")),
    ("training", ("train",)),
    ("engine", ("api",)),
    ("apps", ("bench", "server")),
    ("entry", ("cli", "commands", "")),   # "" = the package itself (draftwise/__init__.py)
]


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the draftwise modules it imports (relative names, '' for the package)."""
    edges: dict[str, set[str]] = {}
    for m, p in mods.items():
        pkg = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        found: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg[: len(pkg) - (node.level - 1)] + ([node.module] if node.module else [])
                    name = ".".join(x for x in base if x)
                elif node.module == "draftwise" or (node.module or "").startswith("draftwise."):
                    name = node.module.removeprefix("draftwise").lstrip(".")
                else:
                    continue
                for a in node.names:
                    full = f"{name}.{a.name}" if name else a.name
                    found.add(full if full in mods else name)
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("draftwise").lstrip(".") for a in node.names
                          if a.name == "draftwise" or a.name.startswith("draftwise.")}
        edges[m] = {x for x in found if x != m}
    return edges


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if module == pre or (pre and module.startswith(pre + ".")) or (pre == "" and module == ""):
                if len(pre) > best:
                    best, rank = len(pre), i
    if rank is None:
        raise AssertionError(f"module draftwise.{module} has no layer: add it to LAYERS in {__file__}")
    return rank


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def upward(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m or 'draftwise'} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
                  for m, deps in edges.items() for d in deps if layer_of(d) > layer_of(m))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):                                   # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_imports_point_down():
    bad = upward(imports(modules()))
    assert not bad, "imports pointing up:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(imports(modules()))
    assert not found, f"import cycles: {found}"


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path):
    """The checks above can fail: a drafter importing the loop lazily, and two modules importing
    each other, are both reported."""
    pkg = tmp_path / "draftwise"
    (pkg / "drafters").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "drafters" / "__init__.py").write_text("")
    (pkg / "drafters" / "x.py").write_text("def f():\n    from draftwise.decoding import decode\n")
    (pkg / "decoding.py").write_text("from draftwise import tree\n")
    (pkg / "tree.py").write_text("from . import sampling\n")
    (pkg / "sampling.py").write_text("import draftwise.tree\n")
    edges = imports(modules(pkg))
    assert upward(edges) == ["drafters.x (drafters) imports decoding (core)"]
    assert cycles(edges) == [["sampling", "tree"]]


def test_engine_view_implementations(tmp_path):
    """Everything that hands an engine to method factories has every member of EngineView."""
    import importlib.util
    import inspect

    from draftwise.api import Engine
    from draftwise.drafters.spec import EngineView
    from tests.fixtures import TinyEngine
    from tests.helpers import tiny_model
    from tests.test_early_exit import TinyTrainEngine

    members = [n for n in EngineView.__annotations__] + \
        [n for n, v in vars(EngineView).items() if callable(v) and not n.startswith("_")]
    assert {"model", "draft_model", "draft_bridge", "tokenizer", "shared", "cost_curve", "vocab_subset"} <= set(members)
    m = tiny_model(tmp_path)
    assert isinstance(TinyEngine(m), EngineView)
    assert isinstance(TinyTrainEngine(m, None), EngineView)
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT.parent / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert isinstance(gpu_check.BenchEngine(m, None, None, None), EngineView)
    init = inspect.getsource(Engine.__init__)
    for n in members:
        assert callable(getattr(Engine, n, None)) or f"self.{n}" in init, f"Engine lacks {n}"

    class Partial:                       # the check can fail
        model = draft_model = tokenizer = None

    assert not isinstance(Partial(), EngineView)
