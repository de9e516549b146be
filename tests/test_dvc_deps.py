"""`dvc.yaml` declares every module a stage imports and every param it reads.

DVC decides what is stale from the `deps:` and `params:` a stage declares, nothing else: a
module or a param a stage uses but does not declare can change while DVC calls the stage's
outputs up to date. These tests compute, for each stage named in `dvc.yaml`, what the stage
really depends on, and fail naming the stage and the missing module or param.

Code: the transitive import closure of `pipeline/stages/<stage>.py` inside the project, and
of any other project module the cmd runs (a launcher: `python -m pipeline.ops.launch ... -m
pipeline.stages.pretrain`; the stage module is found anywhere in the cmd). Every
`ast.Import` / `ast.ImportFrom` anywhere in a module counts (imports inside functions too),
`from pipeline.x import y` adds `pipeline.x` and also `pipeline.x.y` when `y` is a module,
relative imports are resolved, `importlib.import_module("pipeline.x")` with a literal name
counts, and the `__init__.py` of every package on the way counts (importing a module runs
them). A module is covered when its file, or any folder above it, is a dep of the stage, so
package-level deps (`pipeline/data`) work.

Params: reads of the `Config` object found by `ast` in the code the stage can run: the
module-level code of the closure's modules, all of the stage module (and launcher), and
each top-level function or class they reference by name, transitively (so a module imported
for one helper does not bring in the reads of its other functions). The reads are:
- attribute chains on a config root: `cfg.synthesize.mimic.max_chars`, `self.cfg.pretrain.lr`,
  `cfg.seed`. A root is a name `cfg` (unless annotated with a non-config type, like the
  model's `cfg: GPTConfig`), any parameter annotated `Config`, or an attribute `.cfg`. A
  chain is a read only when its first attribute is a section of `Config` (the dataclass
  fields); it is cut where it leaves the schema (`cfg.validate.sources[0].kind` reads
  `validate.sources`);
- local aliases in a function: `p = cfg.pretrain; p.lr` reads `pretrain.lr`, also in tuple
  form (`v, sw = cfg.validate, cfg.storyworld`) and in nested functions;
- parameters annotated with a sub-config type: `gate: GateConfig; gate.max_ece` reads
  `register.gate.max_ece` (types used at one place of the schema only);
- a config section handed on whole (`GPTConfig.from_params(cfg.model, ...)`, `f(p)` with
  `p = cfg.pretrain`) reads the whole section, because the callee's use is not followed;
- `cfg.path("tokenizer")` reads `paths.tokenizer`.

A declared param covers itself and everything under it (`synthesize` covers
`synthesize.mimic.max_chars`). Sections that shape no stage's outputs are listed in one
place, a marked line of `dvc.yaml`'s header (`EXCLUDED_MARK` below); today: `tracking`.

`paths.*` reads: a path a stage reads is data, so it must be in the stage's definition as
`${paths.<k>}` (in `deps`, `outs`, `metrics` or `plots`). That tracks the files, and also
the path itself: DVC compares the resolved stage with `dvc.lock`, so a changed path
re-runs the stage without a `paths` param. Declaring the `paths` section does not cover a
`paths.<k>` read (a param tracks the path string, not the files behind it); the exact key
`paths.<k>` does, for working state that is no DVC dep or out (the pretrain checkpoints).
A read of the whole `paths` section (`getattr(cfg.paths, key)`) needs `paths` declared.

Limitations of the static analysis (reads it cannot see, so it may miss a param):
- a config object passed to a function under another, unannotated name
  (`def f(settings): settings.pretrain.lr`) is not followed (annotate it `Config`, or
  name it `cfg`); nor is a sub-config stored in a container, an attribute other than
  `.cfg`, or a list element bound by a loop (`for s in cfg.validate.sources: s.kind`
  is still caught, as `validate.sources`, by the chain that produced the list);
- dynamic access with a variable key (`getattr(cfg.validate, name)`) counts as a read of
  the whole object it is taken from (`validate`), and code reached only through
  `getattr(module, name)` is not seen at all;
- a referenced class brings all its methods, used or not (a possible false positive);
- the whole-config dumps `cfg.to_dict()` / `cfg.to_yaml()` / `save_resolved(cfg)` (the
  resolved config written next to outputs and logged to MLflow as a record of how they
  were made) are not counted as reads of every param, and the config module's own
  cross-key validation is not counted either: neither computes an output from a param.
A dynamic check (running each stage's `run` on a recording proxy of the Config) would need
every stage's inputs, i.e. a whole pipeline run; that is what tests/test_pipeline_e2e.py
pays for, so it is not repeated here.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import Config

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"
STAGE_MODULE = re.compile(r"\bpipeline\.stages\.([A-Za-z_][A-Za-z0-9_]*)")
CMD_MODULE = re.compile(r"\bpipeline(?:\.[A-Za-z_][A-Za-z0-9_]*)+")  # a launcher too
INTERPOLATION = re.compile(r"\$\{\s*([^}]+?)\s*\}")
# The one place that lists the params sections no stage needs to declare: a line of
# dvc.yaml's header comment, `# <EXCLUDED_MARK> tracking, ...`.
EXCLUDED_MARK = "Not-output-shaping params sections:"


# --------------------------------------------------------------------------------------
# dvc.yaml and params.yaml
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml, with `${...}` resolved from params.yaml."""

    name: str
    module: str  # pipeline.stages.<name>
    entries: tuple[str, ...]  # every project module the cmd runs: the stage's, a launcher's
    deps: tuple[str, ...]  # resolved, normalised relative paths
    params: tuple[str, ...]  # declared keys of params.yaml
    path_keys: frozenset[str]  # k of every ${paths.k} in deps/outs/metrics/plots


def _lookup(params: dict[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _resolve(text: str, params: dict[str, Any]) -> str:
    """`${paths.tokenizer}/meta.json` -> `data/tokenizer/meta.json` (unknown keys stay)."""

    def sub(m: re.Match[str]) -> str:
        value = _lookup(params, m.group(1))
        return m.group(0) if value is None or isinstance(value, dict | list) else str(value)

    return INTERPOLATION.sub(sub, text)


def _norm(path: str) -> str:
    return Path(path).as_posix().strip("/").removeprefix("./")


def _entry_paths(entries: list[Any] | None) -> list[str]:
    """Paths of a deps/outs/metrics/plots list: plain strings or `{path: options}`."""
    out = []
    for e in entries or []:
        out += [e] if isinstance(e, str) else [str(k) for k in e] if isinstance(e, dict) else []
    return out


def _declared_params(entries: list[Any] | None) -> tuple[str, ...]:
    """Keys of params.yaml a stage declares (`- key`, or `- params.yaml: [keys]`)."""
    out: list[str] = []
    for e in entries or []:
        if isinstance(e, str):
            out.append(e)
        elif isinstance(e, dict):
            out += [str(k) for k in e.get("params.yaml") or []]
    return tuple(out)


def load_stages(root: Path) -> list[Stage]:
    """The stages of `root/dvc.yaml`; each names its module in its cmd."""
    dvc = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    stages = []
    for name, st in (dvc.get("stages") or {}).items():
        cmd = st.get("cmd", "")
        cmd = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
        m = STAGE_MODULE.search(cmd)
        assert m, f"dvc.yaml: stage {name!r}: cmd {cmd!r} names no pipeline.stages.<module>"
        used = " ".join(
            p for k in ("deps", "outs", "metrics", "plots") for p in _entry_paths(st.get(k))
        )
        path_keys = {
            k.split(".", 1)[1] for k in INTERPOLATION.findall(used) if k.startswith("paths.")
        }
        stages.append(
            Stage(
                name=name,
                module=f"{PACKAGE}.stages.{m.group(1)}",
                entries=tuple(
                    dict.fromkeys(
                        x for x in CMD_MODULE.findall(cmd) if module_file(root, x) is not None
                    )
                ),
                deps=tuple(_norm(_resolve(d, params)) for d in _entry_paths(st.get("deps"))),
                params=_declared_params(st.get("params")),
                path_keys=frozenset(path_keys),
            )
        )
    return stages


def excluded_sections(root: Path) -> set[str]:
    """Params sections that shape no outputs, from the marked line of dvc.yaml's header."""
    for line in (root / "dvc.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and EXCLUDED_MARK in line:
            return set(re.findall(r"[A-Za-z_]\w*", line.split(EXCLUDED_MARK, 1)[1]))
    raise AssertionError(f"dvc.yaml: no header comment line with {EXCLUDED_MARK!r} <sections>")


# --------------------------------------------------------------------------------------
# Import closure
# --------------------------------------------------------------------------------------


def module_file(root: Path, module: str) -> Path | None:
    """`pipeline.a.b` -> root/pipeline/a/b.py or root/pipeline/a/b/__init__.py."""
    base = root.joinpath(*module.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _with_parents(module: str) -> list[str]:
    """`pipeline.a.b` -> pipeline, pipeline.a, pipeline.a.b: importing b runs every __init__."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def direct_imports(root: Path, module: str) -> set[str]:
    """Project modules `module` imports anywhere in its body (functions included)."""
    path = module_file(root, module)
    assert path is not None, f"{module}: no file under {root}"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            found.update(m for m in _with_parents(name) if module_file(root, m))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            add(base)
            for alias in node.names:  # `from pipeline import checkpoint`: a module
                if alias.name != "*" and module_file(root, f"{base}.{alias.name}"):
                    add(f"{base}.{alias.name}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node.args[0].value)
    found.discard(module)
    return found


def import_closure(root: Path, *entries: str) -> set[str]:
    """The `entries` modules and every project module they import, transitively."""
    seen = {p for e in entries for p in _with_parents(e)}
    todo = list(seen)
    while todo:
        for m in direct_imports(root, todo.pop()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return {m for m in seen if module_file(root, m)}


def covered(rel_file: str, deps: tuple[str, ...]) -> bool:
    """A file is covered by a dep equal to it or to any folder above it."""
    return any(rel_file == d or rel_file.startswith(d + "/") for d in deps)


# --------------------------------------------------------------------------------------
# Config reads
# --------------------------------------------------------------------------------------


# Config dataclasses that are also plain value types of the library, so an annotation with
# one names no params key: DecodingConfig is `register.decoding`, but evaluate builds one from
# its own keys and every served request is one (pipeline/model/generate.py takes any). Reads
# of register.decoding itself go through `cfg.register.decoding`, which the chains catch.
VALUE_TYPES = {"DecodingConfig"}


@dataclass
class Schema:
    """The tree of Config dataclasses: which attribute names are keys, and where."""

    tree: dict[str, Any]  # key -> subtree (dict) or None (leaf / list of records)
    types: dict[str, tuple[str, ...]] = field(default_factory=dict)  # SubConfig -> key path

    @classmethod
    def of(cls, root_type: type) -> Schema:
        seen: dict[str, list[tuple[str, ...]]] = {}

        def build(tp: type, prefix: tuple[str, ...]) -> dict[str, Any]:
            hints = typing.get_type_hints(tp)
            out: dict[str, Any] = {}
            for f in dataclasses.fields(tp):
                if f.metadata.get("internal"):
                    continue
                ftp, key = hints[f.name], (*prefix, f.name)
                item = typing.get_args(ftp)[0] if typing.get_origin(ftp) is list else None
                if dataclasses.is_dataclass(ftp):
                    seen.setdefault(ftp.__name__, []).append(key)
                    out[f.name] = build(ftp, key)
                else:
                    if dataclasses.is_dataclass(item):  # list of records: the list is the key
                        seen.setdefault(item.__name__, []).append(key)
                    out[f.name] = None
            return out

        tree = build(root_type, ())
        unique = {
            name: keys[0]
            for name, keys in seen.items()
            if len(keys) == 1 and name not in VALUE_TYPES
        }
        return cls(tree, unique)

    def cut(self, prefix: tuple[str, ...], attrs: list[str]) -> tuple[str, ...]:
        """The longest schema key along `prefix + attrs` (stops at a method, a leaf...)."""
        node: Any = self.tree
        for k in prefix:
            node = node[k]
        key = list(prefix)
        for a in attrs:
            if not isinstance(node, dict) or a not in node:
                break
            key.append(a)
            node = node[a]
        return tuple(key)


def _chain(node: ast.expr) -> tuple[ast.expr, list[str]]:
    """`a.b.c` -> (Name a, ['b', 'c']); the base is whatever is not an Attribute."""
    attrs: list[str] = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    return node, attrs[::-1]


class _ReadFinder:
    """Collects the params.yaml keys one module reads from the Config object."""

    def __init__(self, schema: Schema, config_type_name: str) -> None:
        self.schema = schema
        self.config_name = config_type_name
        self.reads: set[tuple[str, ...]] = set()
        self.alias_sources: set[int] = set()  # ids of the chains on the right of an alias

    # A binding maps a local name to the key path it stands for; () is the whole Config.
    def _annotation_binding(self, ann: ast.expr | None) -> tuple[str, ...] | bool | None:
        """Key path of an annotation naming Config or a sub-config; False: another type."""
        if ann is None:
            return None
        text = ast.unparse(ann).strip("'\"").replace(" ", "")
        names = {t.rpartition(".")[2] for t in text.split("|") if t != "None"}
        if names == {self.config_name}:
            return ()
        for n in names:
            if n in self.schema.types:
                return self.schema.types[n]
        return False

    def _key_of(self, expr: ast.expr, env: dict[str, tuple[str, ...]]) -> tuple[str, ...] | None:
        """Key path `expr` denotes if it is a config chain: `cfg.pretrain` -> ('pretrain',).

        () is the whole Config; None: not a config chain (or not a params key, like cfg.root).
        """
        base, attrs = _chain(expr)
        if isinstance(base, ast.Name) and base.id in env:
            root = env[base.id]
        elif "cfg" in attrs:  # `self.cfg.pretrain.lr`: the Config held as an attribute
            root, attrs = (), attrs[attrs.index("cfg") + 1 :]
        else:
            return None
        if root == () and attrs and attrs[0] not in self.schema.tree:
            return None  # cfg.root, cfg.to_yaml: not a params key
        return self.schema.cut(root, attrs)

    def scan_module(self, tree: ast.Module) -> None:
        self._scan_body(tree, {"cfg": ()})

    def _scan_body(self, scope: ast.AST, outer: dict[str, tuple[str, ...]]) -> None:
        env = dict(outer)
        if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            a = scope.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
                b = self._annotation_binding(getattr(arg, "annotation", None))
                if b is False:
                    env.pop(arg.arg, None)  # e.g. `cfg: GPTConfig` is not the Config
                elif b is not None:
                    env[arg.arg] = b
                elif arg.arg == "cfg":
                    env["cfg"] = ()
                else:
                    env.pop(arg.arg, None)
        own = list(_own_nodes(scope))
        # Aliases first (`p = cfg.pretrain`), then reads, so order in the body does not matter.
        for node in own:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    self._bind(target, node.value, env)
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                self._bind(node.target, node.value, env)
        for node in own:
            self._visit_reads(node, env)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
                self._scan_body(node, env)

    def _bind(self, target: ast.expr, value: ast.expr, env: dict[str, tuple[str, ...]]) -> None:
        if isinstance(target, ast.Tuple | ast.List) and isinstance(value, ast.Tuple | ast.List):
            for t, v in zip(target.elts, value.elts, strict=False):
                self._bind(t, v, env)
        elif isinstance(target, ast.Name) and isinstance(value, ast.Attribute | ast.Name):
            key = self._key_of(value, env)
            if key is not None:
                env[target.id] = key
                self.alias_sources.add(id(value))  # `p = cfg.pretrain` alone reads nothing

    def _visit_reads(self, node: ast.AST, env: dict[str, tuple[str, ...]]) -> None:
        """Reads in `node` itself (not in nested functions, which get their own scope)."""
        if isinstance(node, ast.Attribute) and not isinstance(
            getattr(node, "_parent", None), ast.Attribute
        ):
            self._read(node, env)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            parent = getattr(node, "_parent", None)
            if not isinstance(parent, ast.Attribute) and env.get(node.id):
                self.reads.add(env[node.id])  # a section handed on whole
        elif isinstance(node, ast.Call):
            f = node.func
            if (
                isinstance(f, ast.Attribute)
                and f.attr == "path"
                and self._key_of(f.value, env) == ()
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                self.reads.add(("paths", str(node.args[0].value)))

    def _read(self, node: ast.Attribute, env: dict[str, tuple[str, ...]]) -> None:
        if id(node) in self.alias_sources:
            return
        key = self._key_of(node, env)
        if key:
            self.reads.add(key)


def _own_nodes(scope: ast.AST):
    """Nodes of `scope`, not descending into nested function/class bodies (yielded once)."""
    todo = list(ast.iter_child_nodes(scope))
    for child in todo:
        child._parent = scope  # type: ignore[attr-defined]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            # decorators, defaults and annotations belong to the enclosing scope
            extra = [*getattr(node, "decorator_list", [])]
            if not isinstance(node, ast.ClassDef):
                extra += [d for d in [*node.args.defaults, *node.args.kw_defaults] if d]
            for c in extra:
                c._parent = node  # type: ignore[attr-defined]
            todo += extra
            continue
        for c in ast.iter_child_nodes(node):
            c._parent = node  # type: ignore[attr-defined]
            todo.append(c)


# --------------------------------------------------------------------------------------
# Reachable code: which top-level functions and classes a stage can run
# --------------------------------------------------------------------------------------


def _parse(root: Path, module: str) -> ast.Module:
    path = module_file(root, module)
    assert path is not None, f"{module}: no file under {root}"
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@dataclass
class _ModuleIndex:
    """Top-level definitions of a module and what its imported names stand for."""

    defs: dict[str, ast.stmt]  # top-level def/class name -> node
    # local name -> ("module", module) or ("def", module, name), from imports anywhere in it
    names: dict[str, tuple[str, ...]]
    top: list[ast.stmt]  # module-level statements other than defs: they run on import


def _is_main_guard(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.If)
        and isinstance(stmt.test, ast.Compare)
        and isinstance(stmt.test.left, ast.Name)
        and stmt.test.left.id == "__name__"
    )


def _index(root: Path, module: str, tree: ast.Module) -> _ModuleIndex:
    path = module_file(root, module)
    package = (
        module if path is not None and path.name == "__init__.py" else module.rpartition(".")[0]
    )
    defs: dict[str, ast.stmt] = {}
    top: list[ast.stmt] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defs[stmt.name] = stmt
        elif not _is_main_guard(stmt):  # `if __name__ == "__main__":` does not run on import
            top.append(stmt)
    names: dict[str, tuple[str, ...]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = ("module", a.name)
                else:  # `import pipeline.x` binds `pipeline`
                    top_name = a.name.split(".")[0]
                    names[top_name] = ("module", top_name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                sub = f"{base}.{a.name}"
                names[a.asname or a.name] = (
                    ("module", sub) if module_file(root, sub) else ("def", base, a.name)
                )
    return _ModuleIndex(defs, names, top)


def reachable_code(
    root: Path, entries: tuple[str, ...], modules: set[str]
) -> dict[str, list[ast.stmt]]:
    """Per module of the closure: the statements a stage can run.

    That is the module-level code of every module (it runs on import), all of the entry
    modules (the stage's, and a launcher's named in the cmd), and every top-level function
    or class referenced, transitively, from those by name (`f`, `mod.f`, `pipeline.mod.f`,
    through re-exports too). A class brings all of its methods. Code reached only through
    `getattr(module, name)` is not seen.
    """
    trees = {m: _parse(root, m) for m in modules}
    index = {m: _index(root, m, t) for m, t in trees.items()}
    picked: dict[str, dict[int, ast.stmt]] = {m: {id(s): s for s in index[m].top} for m in modules}
    todo: list[tuple[str, ast.AST]] = [(m, s) for m in modules for s in index[m].top]
    for entry in entries:
        for d in index[entry].defs.values():
            picked[entry][id(d)] = d
            todo.append((entry, d))
    done: set[tuple[str, str]] = set()

    def want(module: str, name: str) -> None:
        """Reach top-level `name` of `module` (a def, or a name it re-exports)."""
        if module not in index or (module, name) in done:
            return
        done.add((module, name))
        ix = index[module]
        if name in ix.defs:
            node = ix.defs[name]
            if id(node) not in picked[module]:
                picked[module][id(node)] = node
                todo.append((module, node))
        elif name in ix.names:
            target = ix.names[name]
            if target[0] == "def":
                want(target[1], target[2])

    def resolve(module: str, expr: ast.expr) -> None:
        """A Name or an attribute chain that may denote a project def: reach it."""
        base, attrs = _chain(expr)
        if not isinstance(base, ast.Name):
            return
        ix = index[module]
        if base.id in ix.defs:
            want(module, base.id)
            return
        target = ix.names.get(base.id)
        if target is None:
            return
        if target[0] == "def":
            want(target[1], target[2])
            return
        mod = target[1]
        for a in attrs:  # pipeline . data . ingest . storyworld_spec
            if module_file(root, f"{mod}.{a}"):
                mod = f"{mod}.{a}"
            else:
                want(mod, a)
                return

    while todo:
        module, node = todo.pop()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name | ast.Attribute):
                resolve(module, sub)
    return {m: list(picked[m].values()) for m in modules}


def config_reads(root: Path, entries: tuple[str, ...], modules: set[str]) -> dict[str, set[str]]:
    """Dotted params keys read by the reachable code of each module.

    The config module (or package, once regrouped) is left out: its reads are the cross-key
    validation every stage runs on load, which rejects a config but computes no output.
    """
    schema = Schema.of(Config)
    code = reachable_code(root, entries, modules)
    out: dict[str, set[str]] = {}
    config_pkg = f"{PACKAGE}.config"
    for m in sorted(modules):
        if m in (config_pkg, Config.__module__) or m.startswith(config_pkg + "."):
            continue
        finder = _ReadFinder(schema, Config.__name__)
        finder.scan_module(ast.Module(body=code[m], type_ignores=[]))
        out[m] = {".".join(k) for k in finder.reads}
    return out


def is_declared(key: str, declared: tuple[str, ...]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


# --------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------


def missing_code_deps(root: Path, stage: Stage) -> list[str]:
    missing = []
    for m in sorted(import_closure(root, *stage.entries)):
        rel = module_file(root, m).relative_to(root).as_posix()  # type: ignore[union-attr]
        if not covered(rel, stage.deps):
            missing.append(f"{rel} (module {m})")
    return missing


def missing_params(root: Path, stage: Stage, excluded: set[str]) -> list[str]:
    reads = config_reads(root, stage.entries, import_closure(root, *stage.entries))
    missing: dict[str, set[str]] = {}
    for module, keys in reads.items():
        for key in keys:
            if not _param_covered(key, stage, excluded):
                missing.setdefault(key, set()).add(module)
    return [f"{k} (read in {', '.join(sorted(ms))})" for k, ms in sorted(missing.items())]


def _param_covered(key: str, stage: Stage, excluded: set[str]) -> bool:
    section, _, rest = key.partition(".")
    if section in excluded:
        return True
    if section == "paths" and rest:
        # A path is data: `${paths.k}` in the stage's deps/outs tracks the files (and the
        # path, since it is part of the resolved stage). Declaring the `paths` section as a
        # param would track the path string only, so it does not cover a read; the exact
        # key `paths.k` does, for working state that is no DVC dep or out (checkpoints).
        return rest.split(".")[0] in stage.path_keys or key in stage.params
    return is_declared(key, stage.params)


STAGES = load_stages(REPO)


def test_dvc_yaml_names_a_module_for_every_stage() -> None:
    assert STAGES, "dvc.yaml: no stages"
    for st in STAGES:
        assert module_file(REPO, st.module), (
            f"dvc.yaml: stage {st.name!r} runs {st.module}, which has no file under {REPO}"
        )


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_code_deps_cover_the_import_closure(stage: Stage) -> None:
    missing = missing_code_deps(REPO, stage)
    assert not missing, (
        f"dvc.yaml: stage {stage.name!r} imports modules its deps do not cover "
        f"(add the file or a folder above it to `deps:`):\n  " + "\n  ".join(missing)
    )


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_params_cover_the_config_reads(stage: Stage) -> None:
    missing = missing_params(REPO, stage, excluded_sections(REPO))
    assert not missing, (
        f"dvc.yaml: stage {stage.name!r} reads params it does not declare "
        f"(add the key or its section to `params:`):\n  " + "\n  ".join(missing)
    )


@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_code_deps_exist(stage: Stage) -> None:
    """A code dep left behind by a moved module would make `dvc repro` fail on a missing dep."""
    gone = [d for d in stage.deps if d.startswith(PACKAGE + "/") and not (REPO / d).exists()]
    assert not gone, f"dvc.yaml: stage {stage.name!r} has deps that do not exist: {gone}"


def test_excluded_sections_are_config_sections() -> None:
    sections = {f.name for f in dataclasses.fields(Config) if not f.metadata.get("internal")}
    unknown = excluded_sections(REPO) - sections
    assert not unknown, f"dvc.yaml header: {EXCLUDED_MARK} names unknown sections {unknown}"


# --------------------------------------------------------------------------------------
# The analysis itself, on a throwaway package whose answer is known by construction
# --------------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")


FAKE = {
    "pipeline/__init__.py": "",
    "pipeline/stages/__init__.py": "",
    "pipeline/core/__init__.py": "from .seeding import derive_seed\n",
    "pipeline/core/seeding.py": "import hashlib\n",
    "pipeline/core/unused.py": "",
    "pipeline/helpers.py": "from . import lazy\ndef g(cfg):\n    return lazy.f(cfg)\n",
    "pipeline/lazy.py": "",
    "pipeline/infunc.py": "",
    "pipeline/dyn.py": "",
    "pipeline/launcher.py": "",
    "pipeline/stages/demo.py": (
        "import importlib\n"
        "from pipeline import helpers\n"
        "from pipeline.core.seeding import derive_seed\n"
        "from ..config import Config\n"
        "def run(cfg):\n"
        "    import pipeline.infunc\n"
        "    importlib.import_module('pipeline.dyn')\n"
        "    return helpers.g(cfg)\n"
    ),
    "pipeline/config/__init__.py": "",
}


def test_import_closure_follows_every_import_form(tmp_path: Path) -> None:
    _write(tmp_path, FAKE)
    got = import_closure(tmp_path, "pipeline.stages.demo")
    want = {
        "pipeline",
        "pipeline.stages",
        "pipeline.stages.demo",
        "pipeline.helpers",
        "pipeline.lazy",  # relative `from . import lazy` in helpers
        "pipeline.core",  # package __init__ on the way to core.seeding
        "pipeline.core.seeding",
        "pipeline.config",  # `from ..config import Config`
        "pipeline.infunc",  # import inside a function
        "pipeline.dyn",  # importlib.import_module with a literal name
    }
    assert got == want, f"closure: extra {got - want}, missing {want - got}"
    # Folder deps cover everything below them; a sibling file is not covered by a prefix.
    assert covered("pipeline/core/seeding.py", ("pipeline/core",))
    assert not covered("pipeline/core/seeding.py", ("pipeline/co",))
    assert not covered("pipeline/helpers.py", ("pipeline/core",))


READS_SOURCE = """
from pipeline.config import Config, GateConfig

def a(cfg: Config):
    p = cfg.pretrain
    v, m = cfg.validate, cfg.synthesize.mimic
    x = p.lr + v.min_chars + m.max_chars + cfg.seed
    GPTConfig.from_params(cfg.model, 3)
    cfg.path("tokenizer")
    cfg.validate.sources[0].kind
    def inner():
        return p.min_lr
    return cfg.to_yaml(), cfg.root

def b(settings: Config, gate: GateConfig):
    return settings.evaluate.top_k, gate.max_ece

def c(cfg: GPTConfig):
    return cfg.model, cfg.n_embd

class Trainer:
    def step(self):
        return self.cfg.finetune.sam_rho

def d(cfg):
    e = cfg.evaluate
    helper(e)
    return cfg.synthesize.items()
"""


def test_config_reads_follow_chains_aliases_and_annotations() -> None:
    finder = _ReadFinder(Schema.of(Config), Config.__name__)
    finder.scan_module(ast.parse(READS_SOURCE))
    got = {".".join(k) for k in finder.reads}
    want = {
        "pretrain.lr",
        "pretrain.min_lr",  # alias used in a nested function
        "validate.min_chars",
        "synthesize.mimic.max_chars",
        "seed",
        "model",  # handed on whole
        "paths.tokenizer",
        "validate.sources",
        "evaluate.top_k",  # parameter annotated Config under another name
        "register.gate.max_ece",  # parameter annotated with a sub-config
        "finetune.sam_rho",  # self.cfg
        "evaluate",  # alias handed on whole
        "synthesize",  # a method call on a section: the chain stops at the section
    }
    # `cfg: GPTConfig` is not the Config; cfg.to_yaml() / cfg.root are not params.
    assert got == want, f"reads: extra {got - want}, missing {want - got}"


def test_detects_a_missing_module_and_param(tmp_path: Path) -> None:
    """End to end on a fake project: a stage missing a dep and a param fails, naming both."""
    _write(tmp_path, FAKE)
    (tmp_path / "pipeline/lazy.py").write_text(
        "def f(cfg):\n"
        "    x = cfg.synthesize.continuation_chars, cfg.tracking.uri\n"
        "    return x, cfg.path('tokenizer'), cfg.path('synthetic')\n"
        "def unused(cfg):\n"  # no stage code calls it: its read is not the stage's
        "    return cfg.evaluate.top_k\n",
        encoding="utf-8",
    )
    (tmp_path / "params.yaml").write_text("paths:\n  tokenizer: data/tok\n", encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text(
        f"# {EXCLUDED_MARK} tracking\n"
        "stages:\n"
        "  demo:\n"
        "    cmd: python -m pipeline.launcher --standalone -m pipeline.stages.demo --x 1\n"
        "    deps:\n"
        + "".join(
            f"      - {d}\n"
            for d in (
                "${paths.tokenizer}",
                "pipeline/stages",
                "pipeline/core/",
                "pipeline/config/__init__.py",
                "pipeline/__init__.py",
                "./pipeline/helpers.py",
                "pipeline/infunc.py",
            )
        )
        + "    params:\n      - synthesize.mimic\n      - paths\n",
        encoding="utf-8",
    )
    (stage,) = load_stages(tmp_path)
    assert stage.module == "pipeline.stages.demo"
    assert stage.entries == ("pipeline.launcher", "pipeline.stages.demo")
    assert "data/tok" in stage.deps
    assert missing_code_deps(tmp_path, stage) == [
        "pipeline/dyn.py (module pipeline.dyn)",
        "pipeline/launcher.py (module pipeline.launcher)",  # run by the cmd, not imported
        "pipeline/lazy.py (module pipeline.lazy)",
    ]
    # paths.tokenizer is a dep; a declared `paths` section does not stand in for the
    # synthetic data; tracking is excluded by the header line.
    assert missing_params(tmp_path, stage, excluded_sections(tmp_path)) == [
        "paths.synthetic (read in pipeline.lazy)",
        "synthesize.continuation_chars (read in pipeline.lazy)",
    ]
