"""The package's shape holds: no import cycles, and every import points down the layers of DESIGN.md.

core ← train ← inference ← systems ← papers ← entry. Imports inside functions count too: a lazy import is a
dependency all the same. Reading a checkpoint never imports the trainer, inference never imports search, and
nothing imports the CLI."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "scalelab"

LAYERS = {
    "core": ["errors", "config", "log", "tokenizer", "data", "model", "checkpoint", "report"],
    "train": ["train", "distributed", "ft", "diffusion", "tb"],
    "inference": ["engine", "gguf", "quant", "backends", "scheduler", "serve", "export"],
    "systems": ["search", "horizon", "horizon_report", "scaling", "wallclock", "compare"],
    "papers": ["papers"],
    "entry": ["cli", "mcp_server", "jobs", "__main__"],
}
RANK = {name: i for i, names in enumerate(LAYERS.values()) for name in names}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(name: str, modules: set[str]) -> str | None:
    """The scalelab module an import names: itself, or the longest prefix that is a module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from scalelab.search import tasks` names the submodule when there is one
                targets = [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t.startswith("scalelab"):
                    dep = resolve(t, modules)
                    if dep and dep != mod and dep != "scalelab":
                        graph[mod].add(dep)
    return graph


def layer(mod: str) -> int:
    top = mod.split(".")[1] if mod.count(".") else mod
    assert top in RANK, f"module {mod} is in no layer of tests/test_layers.py: place it"
    return RANK[top]


def test_every_module_has_a_layer():
    for mod in import_graph():
        if mod != "scalelab":
            layer(mod)


def test_no_import_cycles():
    graph = import_graph()
    # Tarjan's strongly connected components: any component of two or more modules is a cycle
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
            comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = [sorted(c) for c in comps if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_imports_point_down():
    upward = [(m, d) for m, deps in import_graph().items() if m != "scalelab" for d in deps if layer(d) > layer(m)]
    assert not upward, "imports that point up a layer: " + ", ".join(f"{m} -> {d}" for m, d in sorted(upward))


def test_named_boundaries():
    graph = import_graph()
    inference = [m for m in graph if m.split(".")[-1] in LAYERS["inference"]]
    assert "scalelab.checkpoint" in graph and "scalelab.train" not in graph["scalelab.checkpoint"]
    for m in inference:
        assert "scalelab.train" not in graph[m], f"{m} imports the trainer"
        assert not any(d.startswith("scalelab.search") for d in graph[m]), f"{m} imports search"
    assert not [m for m, deps in graph.items() if "scalelab.cli" in deps], "nothing imports the CLI"


def test_the_walker_sees_imports():
    """The oracle for the tests above: known edges of the real package are found."""
    graph = import_graph()
    assert "scalelab.engine" in graph["scalelab.backends"]
    assert "scalelab.search.tasks" in graph["scalelab.search.run"]  # `from scalelab.search import tasks`
    assert "scalelab.checkpoint" in graph["scalelab.backends"]  # a lazy import inside a method
