"""The layers of DESIGN.md, checked on the import graph of `pipeline/` and `flows/`.

Every `import` and `from ... import` node of every module counts, wherever it sits (module
level, inside a function, under `if TYPE_CHECKING:`), with relative imports resolved; a
lazy import is still a dependency, only a later one. The layers, top to bottom:

    flows                      Prefect flows and the CLI: may import anything below
    pipeline.stages            one thin module per stage: imports the library, never
                               another stage (the package's `STAGES` list is not a stage)
    library packages           ranked in LIBRARY_RANK below: a package imports only
                               packages of a lower rank, never a sibling of equal rank
    pipeline.config            the typed loader (rank 1: it writes through core.io)
    pipeline.core              errors, atomic io, seeding, progress, markdown (rank 0)

Why each library package sits where it does (from what the code actually needs):
- `text` (tokenizer, shards) and `model` (GPT, decoding, weights) need only core: they
  are independent of each other (the model sees token ids, not a tokenizer).
- `data` (ingest, GX gate, story world, n-gram, drift) needs config and core only; the
  tokenizer stage joins text and data.
- `ops` (tracking, stage runner, locks, reproduce, launch) needs config and core only: it
  wraps the outside world (MLflow, DVC, torchrun) for the stages and flows.
- `train` (loop, optimizer, batches, distributed, checkpoints, SAM) needs `model`
  (checkpoints hold its weights and config) and `text` (batches read token shards).
- `eval` (LM metrics, calibration, generation metrics, sharpness) sits above train: it
  scores a model on shards and uses the training helpers, and train never needs it.
- `serve` (text generation, pyfunc, registry, model card, HF export) needs model and text
  (a checkpoint's weights and tokenizer) and may use train and eval: it is the top of the
  model's life.
- `sweep` (scaling laws) plans and fits pretraining runs with model, text and train:
  same rank as serve, and independent of it.
Besides the ranks, the torch-only core (config, core, text, model, train, eval) imports
no other pipeline package: data, ops, serve and sweep bring MLflow, GX and pandas.

A rule broken by the code makes its test fail naming each edge as
`importer -> imported (file:line)`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("pipeline", "flows")

LIBRARY_RANK: dict[str, int] = {
    "pipeline.core": 0,
    "pipeline.config": 1,
    "pipeline.text": 2,
    "pipeline.model": 2,
    "pipeline.data": 2,
    "pipeline.ops": 2,
    "pipeline.train": 3,
    "pipeline.eval": 4,
    "pipeline.serve": 5,
    "pipeline.sweep": 5,
}
TORCH_ONLY_CORE = (
    "pipeline.config",
    "pipeline.core",
    "pipeline.text",
    "pipeline.model",
    "pipeline.train",
    "pipeline.eval",
)
# What the GPU machines have (DESIGN.md, "Verified facts"): `rich` is among them and draws
# the progress bars of pipeline.core.progress. `yaml` is pyyaml's import name.
TORCH_ONLY_ALLOWED = ("torch", "numpy", "tokenizers", "safetensors", "yaml", "rich")
STAGES = "pipeline.stages"
FORBIDDEN_IN_PIPELINE = ("flows", "prefect")


@dataclass(frozen=True)
class Edge:
    """`importer` imports `imported` at `file:line` (`imported` may be outside the repo)."""

    importer: str
    imported: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.file}:{self.line})"


def find_modules(root: Path, tops: tuple[str, ...] = ROOTS) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package `__init__`) for every .py under `tops`."""
    modules = {}
    for top in tops:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            modules[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return modules


def _absolute(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    """The absolute module a `from` node names: `from ..x import y` in a.b.c is a.x."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_pkg else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_edges(root: Path, tops: tuple[str, ...] = ROOTS) -> list[Edge]:
    """Every import of every module under `tops`, resolved to the most specific module.

    `from pkg import name` is an edge to `pkg.name` when that is a module of the repo, else
    to `pkg` (the name is an attribute of it). External imports keep their dotted name.
    """
    modules = find_modules(root, tops)
    edges = []
    for module, (path, is_pkg) in modules.items():
        rel = str(path.relative_to(root))
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, module, is_pkg)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in dict.fromkeys(targets):
                if target != module:
                    edges.append(Edge(module, target, rel, node.lineno))
    return edges


def package_of(module: str) -> str:
    """`flows`, `pipeline.stages`, a library package such as `pipeline.text`, or `pipeline`."""
    parts = module.split(".")
    if parts[0] != "pipeline":
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 1 else "pipeline"


def is_internal(module: str) -> bool:
    return module.split(".")[0] in ROOTS


def upward(edge: Edge) -> bool:
    """True when `edge` goes up or sideways in the layer order of the module docstring."""
    src, dst = package_of(edge.importer), package_of(edge.imported)
    if src == dst or src == "flows" or not is_internal(edge.imported):
        return False
    if dst == "flows":
        return True
    if src == STAGES:
        return dst not in LIBRARY_RANK  # stages import the library (stage -> stage: its test)
    if src not in LIBRARY_RANK or dst not in LIBRARY_RANK:
        return True  # into stages, or from/into an unranked package (its own test names it)
    if src in TORCH_ONLY_CORE and dst not in TORCH_ONLY_CORE:
        return True
    return LIBRARY_RANK[dst] >= LIBRARY_RANK[src]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one node (or with a self-loop): the cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def cycle_report(edges: list[Edge], key: Callable[[str], str]) -> list[str]:
    """Each cycle of the graph over `key(module)` nodes, with one edge per node pair in it.

    `key` maps a module to its node: the module itself, or its package.
    """
    graph: dict[str, set[str]] = {}
    first: dict[tuple[str, str], Edge] = {}  # the first edge (in file order) per node pair
    for e in edges:
        a, b = key(e.importer), key(e.imported)
        if a != b:
            graph.setdefault(a, set()).add(b)
            first.setdefault((a, b), e)
    out = []
    for comp in strongly_connected(graph):
        closing = [str(e) for (a, b), e in sorted(first.items()) if a in comp and b in comp]
        out.append(f"cycle {' <-> '.join(comp)}: " + "; ".join(closing))
    return out


def _fail(rule: str, violations: list) -> None:
    if violations:
        lines = "\n  ".join(str(v) for v in violations)
        pytest.fail(f"{rule} ({len(violations)}):\n  {lines}", pytrace=False)


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return import_edges(REPO)


@pytest.fixture(scope="module")
def internal(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if is_internal(e.imported)]


# --- the extractor itself, on a made-up tree ---------------------------------------------


def test_extractor_resolves_relative_and_nested_imports(tmp_path: Path) -> None:
    files = {
        "pipeline/__init__.py": "",
        "pipeline/a/__init__.py": "from . import m\n",
        "pipeline/a/m.py": "def f():\n    from ..b import n\n    import pipeline.b.n as x\n",
        "pipeline/a/k.py": "from .m import f\nfrom pipeline.b import VALUE\nimport yaml\n",
        "pipeline/b/__init__.py": "VALUE = 1\n",
        "pipeline/b/n.py": "if True:\n    from pipeline.a import k\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    got = {(e.importer, e.imported, e.line) for e in import_edges(tmp_path, ("pipeline",))}
    assert got == {
        ("pipeline.a", "pipeline.a.m", 1),
        ("pipeline.a.m", "pipeline.b.n", 2),  # relative, inside a function
        ("pipeline.a.m", "pipeline.b.n", 3),
        ("pipeline.a.k", "pipeline.a.m", 1),
        ("pipeline.a.k", "pipeline.b", 2),  # VALUE is an attribute, not a module
        ("pipeline.a.k", "yaml", 3),
        ("pipeline.b.n", "pipeline.a.k", 2),  # nested in an `if`
    }
    # One edge per node pair, the first in the file, so m.py:3 is not repeated.
    assert cycle_report(import_edges(tmp_path, ("pipeline",)), lambda m: m) == [
        "cycle pipeline.a.k <-> pipeline.a.m <-> pipeline.b.n: "
        "pipeline.a.k -> pipeline.a.m (pipeline/a/k.py:1); "
        "pipeline.a.m -> pipeline.b.n (pipeline/a/m.py:2); "
        "pipeline.b.n -> pipeline.a.k (pipeline/b/n.py:2)"
    ]
    # As packages: a -> b first at k.py:2 (k.py is read before m.py), b -> a at n.py:2.
    assert cycle_report(import_edges(tmp_path, ("pipeline",)), package_of) == [
        "cycle pipeline.a <-> pipeline.b: "
        "pipeline.a.k -> pipeline.b (pipeline/a/k.py:2); "
        "pipeline.b.n -> pipeline.a.k (pipeline/b/n.py:2)"
    ]


@pytest.mark.parametrize(
    ("importer", "imported", "up"),
    [
        ("pipeline.train.loop", "pipeline.model.gpt", False),
        ("pipeline.model.gpt", "pipeline.train.loop", True),  # up
        ("pipeline.text.shards", "pipeline.model.gpt", True),  # sideways, equal rank
        ("pipeline.eval.lm", "pipeline.ops.tracking", True),  # core -> outside the core
        ("pipeline.core.io", "pipeline.config.loader", True),
        ("pipeline.serve.textgen", "pipeline.stages", True),
        ("pipeline.stages.pretrain", "pipeline.train.loop", False),
        ("pipeline.stages.pretrain", "flows.cli", True),
        ("flows.cli", "pipeline.stages.pretrain", False),
        ("pipeline.data.ingest", "pyarrow", False),  # external: its own rules
    ],
)
def test_layer_order(importer: str, imported: str, up: bool) -> None:
    assert upward(Edge(importer, imported, "f.py", 1)) is up


# --- the rules on the real code -----------------------------------------------------------


def test_every_library_package_has_a_rank() -> None:
    packages = {package_of(m) for m in find_modules(REPO) if m.startswith("pipeline.")}
    unranked = sorted(packages - set(LIBRARY_RANK) - {STAGES})
    _fail("packages of pipeline/ missing from LIBRARY_RANK (place them in the order)", unranked)


def test_imports_only_go_down(internal: list[Edge]) -> None:
    _fail("upward or sideways imports", [e for e in internal if upward(e)])


def test_no_library_module_imports_the_stages(internal: list[Edge]) -> None:
    bad = [
        e
        for e in internal
        if package_of(e.importer) in LIBRARY_RANK and package_of(e.imported) == STAGES
    ]
    _fail("library modules importing pipeline.stages", bad)


def test_no_stage_imports_another_stage(internal: list[Edge]) -> None:
    bad = [
        e
        for e in internal
        if package_of(e.importer) == STAGES
        and e.imported.startswith(STAGES + ".")
        and e.imported != e.importer
    ]
    _fail("stages importing another stage", bad)


def test_pipeline_never_imports_flows_or_prefect(edges: list[Edge]) -> None:
    bad = [
        e
        for e in edges
        if e.importer.startswith("pipeline") and e.imported.split(".")[0] in FORBIDDEN_IN_PIPELINE
    ]
    _fail("pipeline/ importing flows or prefect", bad)


def test_no_import_cycles(internal: list[Edge]) -> None:
    _fail("import cycles between packages", cycle_report(internal, package_of))
    _fail("import cycles between modules", cycle_report(internal, lambda m: m))


# --- the torch-only core imports with only its allowed packages installed -----------------

_BLOCKED_IMPORT_RUN = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys

    allowed, packages = set(json.loads(sys.argv[1])), json.loads(sys.argv[2])
    blocked = []

    def importer():
        # The first frame outside the import machinery is the module that asked: only
        # pipeline's own imports are checked (torch may import its own dependencies).
        f = sys._getframe(2)
        while f and (
            f.f_code.co_filename.startswith("<frozen")
            or f.f_globals.get("__name__", "").startswith("importlib")
        ):
            f = f.f_back
        return f.f_globals.get("__name__", "?") if f else "?"

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            top = name.partition(".")[0]
            if top in allowed or top == "pipeline" or top in sys.stdlib_module_names:
                return None
            who = importer()
            if not who.startswith("pipeline"):
                return None
            blocked.append((who, name))
            raise ImportError(f"{name} is not available on the GPU machine (blocked)")

    sys.meta_path.insert(0, Block())
    failures = {p: [] for p in packages}
    for pkg_name in packages:
        names = [pkg_name]
        pkg = importlib.import_module(pkg_name)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg_name + ".")]
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as e:
                failures[pkg_name].append(f"{name}: {type(e).__name__}: {e}")
    print(json.dumps({"failures": failures, "blocked": blocked}))
    """
)


def test_torch_only_core_imports_with_only_its_packages() -> None:
    """Every module of the core imports with only TORCH_ONLY_ALLOWED and the stdlib.

    Import time only: a package needed inside a function (scipy in eval.sharpness) is
    allowed, since the GPU machine never calls that function. `pipeline.data` goes through
    the same run as a control: it imports pyarrow at module level, so the blocker must
    stop it, or the run proves nothing.
    """
    control = "pipeline.data"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _BLOCKED_IMPORT_RUN,
            json.dumps(TORCH_ONLY_ALLOWED),
            json.dumps([*TORCH_ONLY_CORE, control]),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"the import run crashed:\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any("pyarrow" in f for f in result["failures"][control]), (
        f"the blocker let {control} import pyarrow: {result['failures'][control]}"
    )
    failures = [f for pkg in TORCH_ONLY_CORE for f in result["failures"][pkg]]
    blocked = sorted(
        {f"{who} imports {name}" for who, name in result["blocked"] if package_of(who) != control}
    )
    if failures:
        pytest.fail(
            "modules of the torch-only core that do not import with only "
            f"{', '.join(TORCH_ONLY_ALLOWED)} and the stdlib:\n  "
            + "\n  ".join(failures)
            + "\nblocked imports:\n  "
            + "\n  ".join(blocked),
            pytrace=False,
        )
