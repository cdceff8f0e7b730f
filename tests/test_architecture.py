"""The dependency rule (docs/architecture.md), checked on the import graph of step3_edge/ read
with `ast` (no module is imported):

* no import cycle among modules at top level (what runs at import time, including the package
  `__init__` files an import runs);
* layers: the core (step3_edge/*.py) imports no stage; quantize imports only the core; export
  and runtime import the core and quantize (its weight schemes), and never each other; app
  sits on top and nothing imports it. An import that crosses these lines, at top level or inside a function, must be
  one of `ALLOWED`, each with its reason, and each of those must still exist (so the list, and
  the table in docs/architecture.md, stay true)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "step3_edge"
STAGES = ("quantize", "export", "runtime", "app")
LAYER = {"core": 0, "quantize": 1, "export": 2, "runtime": 2, "app": 3}

# (importer, imported) -> why the crossing is there; each a candidate to move into the core
ALLOWED: dict[tuple[str, str], str] = {
    ("step3_edge.checkpoint", "step3_edge.quantize.schemes"):
        "the reader decodes stored weight schemes (an offline-stage module, edited elsewhere)",
    ("step3_edge.synth", "step3_edge.quantize.schemes"):
        "synthetic checkpoints are written in stored schemes (an offline-stage module)",
    ("step3_edge.config_schema", "step3_edge.quantize.schemes"):
        "quantization_config names are checked against the known schemes",
    ("step3_edge.cli", "step3_edge.runtime.options"):
        "the runtime flags are generated from RuntimeOptions' fields",
    ("step3_edge.cli", "step3_edge.app.default_bundle"):
        "--model resolves a checkpoint or the embedded default model to a bundle",
    ("step3_edge.generate", "step3_edge.runtime.api"):
        "`generate --model BUNDLE` runs the bundle (inside the function)",
    ("step3_edge.evaluate", "step3_edge.runtime"):
        "`eval` given a bundle runs it (inside the function)",
    ("step3_edge.variants", "step3_edge.export.bundle"):
        "the default model's variants are exported bundles (inside the function)",
    ("step3_edge.export.bundle", "step3_edge.runtime.planner"):
        "plan_placement makes the plan written into the manifest",
    ("step3_edge.export.cli", "step3_edge.runtime.planner"):
        "parse_size reads --cpu-mem",
    ("step3_edge.runtime.ort_backend", "step3_edge.export.onnx_runner"):
        "ONNX Runtime sessions over the bundle's graphs (inside the function)",
    ("step3_edge.runtime.trt_backend", "step3_edge.export.onnx_runner"):
        "TensorRT runs the same graph table as ONNX Runtime",
    ("step3_edge.runtime.trt_backend", "step3_edge.export.binding"):
        "binds the bundle's weights to the engines' inputs",
    ("step3_edge.runtime.trt_backend", "step3_edge.export.trt"):
        "deserializes the bundle's TensorRT engines (inside the function)",
}


def _name(p: Path) -> str:
    parts = list(p.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported step3_edge module, at top level) of every import in `path`; imports inside
    functions and under `if TYPE_CHECKING:` are not top level."""
    me = _name(path)
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(ch, False)
            elif isinstance(ch, ast.If) and "TYPE_CHECKING" in ast.unparse(ch.test):
                visit(ch, False)
            elif isinstance(ch, ast.Import):
                out.extend((a.name, top) for a in ch.names)
            elif isinstance(ch, ast.ImportFrom):
                base = ch.module or ""
                if ch.level:
                    pkg = me.split(".")[:None if path.name == "__init__.py" else -1]
                    pkg = pkg[:len(pkg) - ch.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                for a in ch.names:
                    full = f"{base}.{a.name}"
                    out.append((full if full in MODULES else base, top))
            else:
                visit(ch, top)

    visit(ast.parse(path.read_text()), True)
    found = []
    for name, top in out:
        if name.split(".")[0] == "step3_edge":
            target = _resolve(name)
            if target and target != me:
                found.append((target, top))
    return found


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else "core"


def _edges() -> dict[tuple[str, str], bool]:
    """(importer, imported) -> whether some import of it is at top level."""
    edges: dict[tuple[str, str], bool] = {}
    for m, p in MODULES.items():
        for t, top in _imports(p):
            edges[(m, t)] = edges.get((m, t), False) or top
    return edges


def _crosses(a: str, b: str) -> bool:
    sa, sb = _stage(a), _stage(b)
    return sa != sb and LAYER[sa] <= LAYER[sb]


def test_no_import_cycle_at_top_level() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for (a, b), top in _edges().items():
        if top:
            graph[a].add(b)
            # importing x.y.z runs x/__init__ and x/y/__init__ first, unless they already run
            # (they are packages above the importer itself)
            parts = b.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if parent in MODULES and not (a + ".").startswith(parent + "."):
                    graph[a].add(parent)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(v: str, path: list[str]) -> None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                cycles.append(path[path.index(w):] + [w])
            elif w not in state:
                walk(w, path)
        path.pop()
        state[v] = 2

    for m in sorted(MODULES):
        if m not in state:
            walk(m, [])
    assert not cycles, "top-level import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_follow_the_dependency_rule() -> None:
    crossings = {e for e in _edges() if _crosses(*e)}
    new = sorted(crossings - set(ALLOWED))
    assert not new, ("imports that cross the dependency rule (docs/architecture.md); move the "
                     "code, or add the crossing to ALLOWED with its reason and to the "
                     "architecture document:\n" + "\n".join(f"{a} -> {b}" for a, b in new))
    gone = sorted(set(ALLOWED) - crossings)
    assert not gone, ("ALLOWED crossings that no longer exist (remove them here and in "
                      "docs/architecture.md):\n" + "\n".join(f"{a} -> {b}" for a, b in gone))


def test_nothing_but_the_dispatcher_imports_the_app() -> None:
    into_app = sorted(a for a, b in _edges() if _stage(b) == "app" and _stage(a) != "app")
    assert into_app == ["step3_edge.cli"], into_app


def test_allowed_crossings_are_documented() -> None:
    """Each allowed crossing has a row in the architecture document's table naming the
    importer's file and the imported module."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    rule = doc[doc.index("## The dependency rule"):doc.index("## Data flow between stages")]
    rows = [line for line in rule.splitlines() if line.startswith("|")]
    missing = [f"{a} -> {b}" for a, b in ALLOWED
               if not any(f"{a.rpartition('.')[2]}.py" in r and
                          f"`{b.removeprefix('step3_edge.')}`" in r for r in rows)]
    assert not missing, "crossings without a row in docs/architecture.md:\n" + "\n".join(missing)


def test_the_graph_is_read() -> None:
    """The checks above see the tree: the runtime API imports the scheduler at top level."""
    e = _edges()
    assert e[("step3_edge.runtime.api", "step3_edge.runtime.scheduler")] is True
    assert len(MODULES) > 60
