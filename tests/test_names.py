"""The file names in pipeline/core/names.py and the paths dvc.yaml declares agree.

The code builds every path a stage hands on from `pipeline.core.names`; dvc.yaml, the one
other place, spells the files it declares one by one (`${paths.reports}/evaluate.json`)
out. A name changed on one side only would leave DVC tracking a file nobody writes (and
not tracking the one that is written), so the tests here check both directions:

- every path dvc.yaml declares below a `paths` folder (deps, outs, metrics, plots) is a
  name of that folder's group in core/names;
- every declaration the stages' code implies (what `EXPECTED` lists, built from the names,
  not from dvc.yaml) is in dvc.yaml, under that stage and section.

And the code really uses the names: no module of pipeline/ or flows/ spells one of the
file names out as a string literal (a renamed constant would miss it).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from pipeline.core import names as n
from pipeline.data.clean import SPLITS

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("deps", "outs", "metrics", "plots")
_PATH_REF = re.compile(r"^\$\{paths\.(\w+)\}(?:/(.+))?$")


class Decl(NamedTuple):
    """One path a stage declares: `${paths.<key>}/<name>` in `stage`'s `section`."""

    stage: str
    section: str
    key: str
    name: str

    def __str__(self) -> str:
        return f"{self.stage}.{self.section}: ${{paths.{self.key}}}/{self.name}"


def in_plots(name: str) -> str:
    return f"{n.PLOTS_DIR}/{name}"


# Which names live in which `paths.<key>` folder (all of each group in core/names).
MODEL_FILES = {n.WEIGHTS_FILE, n.MODEL_CONFIG_FILE}
FOLDERS: dict[str, set[str]] = {
    "validated": {n.split_parquet(s) for s in SPLITS} | {n.RESOLVED_CONFIG},
    "synthetic": {n.PRETRAIN_TRAIN, n.FINETUNE_TRAIN, n.FINETUNE_TEST, n.MIMIC, n.STORYWORLD},
    "tokenizer": {n.TOKENIZER_FILE, n.META_FILE, n.RESOLVED_CONFIG}
    | {n.shard_file(s) for s in SPLITS},
    "pretrain": MODEL_FILES | {n.RESOLVED_CONFIG},
    "finetune": MODEL_FILES,
    "reports": {n.report_json(s) for s in n.STAGES}
    | {n.report_md(s) for s in ("finetune", "evaluate")}
    | {in_plots(p) for p in (n.PRETRAIN_LOSS, n.LOSS_BY_POSITION, n.RELIABILITY)},
}

# What the code implies dvc.yaml declares file by file (folders as a whole are not listed):
# the single files a stage reads from a folder it does not take whole, its reports and plots.
EXPECTED: set[Decl] = {
    Decl("tokenizer", "deps", "synthetic", n.PRETRAIN_TRAIN),
    Decl("tokenizer", "deps", "validated", n.split_parquet("val")),
    Decl("tokenizer", "deps", "validated", n.split_parquet("test")),
    Decl("evaluate", "deps", "validated", n.split_parquet("train")),  # the baselines' fit
    Decl("evaluate", "deps", "validated", n.split_parquet("test")),
    Decl("register", "deps", "validated", n.split_parquet("test")),
    # the model card assembles what the stages before it wrote
    *(
        Decl("register", "deps", "reports", n.report_json(s))
        for s in ("validate", "synthesize", "pretrain", "finetune", "evaluate")
    ),
    *(Decl("register", "deps", "reports", n.report_md(s)) for s in ("finetune", "evaluate")),
    *(Decl(s, "metrics", "reports", n.report_json(s)) for s in n.STAGES),
    *(Decl(s, "outs", "reports", n.report_md(s)) for s in ("finetune", "evaluate")),
    Decl("pretrain", "plots", "reports", in_plots(n.PRETRAIN_LOSS)),
    Decl("evaluate", "plots", "reports", in_plots(n.LOSS_BY_POSITION)),
    Decl("evaluate", "plots", "reports", in_plots(n.RELIABILITY)),
}

# Folders DVC tracks whole as some stage's output; the names of their groups live inside.
WHOLE_FOLDERS = ("validated", "synthetic", "tokenizer", "pretrain", "finetune")


def declarations(dvc: dict[str, Any], paths: dict[str, str]) -> tuple[set[Decl], list[str]]:
    """The `${paths.<k>}[/<name>]` entries of every stage (name "" for a whole folder).

    Also the problems met on the way: an unknown `paths` key, or a path written out in full
    where it lies below a `paths` folder (it would not follow a change of that folder).
    """
    found: set[Decl] = set()
    problems: list[str] = []
    for stage, spec in dvc["stages"].items():
        for section in SECTIONS:
            for entry in spec.get(section) or []:
                path = next(iter(entry)) if isinstance(entry, dict) else str(entry)
                m = _PATH_REF.match(path)
                if m is None:
                    below = [k for k, v in paths.items() if path.startswith(f"{v}/")]
                    if below and not path.startswith("pipeline/"):
                        problems.append(
                            f"dvc.yaml {stage}.{section}: {path} is written out; "
                            f"expected ${{paths.{below[0]}}}/..."
                        )
                    continue
                key, name = m.group(1), m.group(2) or ""
                if key not in paths:
                    problems.append(
                        f"dvc.yaml {stage}.{section}: unknown key paths.{key} "
                        f"(params.yaml has {sorted(paths)})"
                    )
                found.add(Decl(stage, section, key, name))
    return found, problems


def mismatches(dvc: dict[str, Any], paths: dict[str, str]) -> list[str]:
    """Every disagreement between dvc.yaml and core/names, one line each naming both."""
    found, problems = declarations(dvc, paths)
    for d in sorted(found):
        if d.name and d.name not in FOLDERS.get(d.key, set()):
            known = sorted(FOLDERS.get(d.key, set()))
            problems.append(
                f"dvc.yaml {d}: no such name in pipeline/core/names.py for "
                f"paths.{d.key} (expected one of {known})"
            )
    for d in sorted(EXPECTED - found):
        problems.append(f"dvc.yaml lacks {d} (a name of pipeline/core/names.py)")
    for d in sorted({d for d in found if d.name} - EXPECTED):
        problems.append(f"dvc.yaml declares {d}, which tests/test_names.py EXPECTED lacks")
    outs = {d.key for d in found if d.section == "outs" and not d.name}
    problems += [
        f"dvc.yaml: no stage has ${{paths.{k}}} as an out" for k in WHOLE_FOLDERS if k not in outs
    ]
    return problems


def load(text: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    dvc = yaml.safe_load(text if text is not None else (REPO / "dvc.yaml").read_text())
    paths = yaml.safe_load((REPO / "params.yaml").read_text())["paths"]
    return dvc, paths


def test_dvc_yaml_paths_are_the_names_of_core_names() -> None:
    problems = mismatches(*load())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("/pretrain_train.parquet", "/pretrain_mix.parquet"),  # a dep
        ("/evaluate.md:", "/eval.md:"),  # an out
        ("/reliability.json", "/calibration.json"),  # a plot
    ],
)
def test_a_name_changed_on_one_side_only_is_caught(old: str, new: str) -> None:
    """dvc.yaml edited alone, as a rename in code alone leaves it: both directions report."""
    text = (REPO / "dvc.yaml").read_text()
    assert text.count(old) == 1, f"dvc.yaml: expected {old!r} once"
    problems = mismatches(*load(text.replace(old, new)))
    assert any(new.strip("/:") in p and "no such name" in p for p in problems), problems
    assert any(old.strip("/:") in p and "lacks" in p for p in problems), problems


# Literals that equal one of our names by the convention of another format or folder.
FOREIGN = {
    ("pipeline/serve/export_hf.py", n.WEIGHTS_FILE),  # Hugging Face's file name
    ("pipeline/ops/launch.py", "f'{stage}.json'"),  # exit records, in .lmforge/exit
}


def file_names() -> set[str]:
    """Every fixed file name of core/names (the templated ones are built by its functions)."""
    return {v for k, v in vars(n).items() if k.isupper() and isinstance(v, str) and "." in v}


def templates() -> set[str]:
    """The endings the name functions of core/names put after a stage or split name."""
    makers = (n.split_parquet, n.shard_file, n.report_json, n.report_md, n.failed_report)
    return {make("") for make in makers}


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, kinds)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def spelled_out(source: str, wanted: set[str], endings: set[str]) -> list[tuple[int, str]]:
    """(line, literal) of each string constant, docstrings aside, that is a name of `wanted`
    or ends in `/<name>` (f-string parts included: `f"{d}/meta.json"`), and of each
    f-string that is one value and one of `endings` (`f"{STAGE}.json"`, shown unparsed)."""
    tree = ast.parse(source)
    skip = docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            v = node.value
            if v in wanted or any(v.endswith(f"/{w}") for w in wanted):
                hits.append((node.lineno, v))
        elif isinstance(node, ast.JoinedStr) and len(node.values) == 2:
            value, tail = node.values
            if (
                isinstance(value, ast.FormattedValue)
                and isinstance(tail, ast.Constant)
                and tail.value in endings
            ):
                hits.append((node.lineno, ast.unparse(node)))
    return sorted(hits)


def test_spelled_out_finds_literals_but_not_docstrings() -> None:
    src = (
        '"""Writes meta.json."""\nA = "meta.json"\nB = f"{x}/meta.json"\nC = "meta.jsonl"\n'
        'D = f"{STAGE}.json"\nE = f"{STAGE}.json.bak"\nF = f"x{STAGE}.json"\n'
    )
    assert spelled_out(src, {"meta.json"}, {".json"}) == [
        (2, "meta.json"),
        (3, "/meta.json"),
        (5, "f'{STAGE}.json'"),
    ]


def test_code_takes_file_names_from_core_names() -> None:
    wanted, endings = file_names(), templates()
    assert {"tokenizer.json", "model.safetensors", "meta.json"} <= wanted
    hits = []
    for path in sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "flows").rglob("*.py")]):
        rel = path.relative_to(REPO).as_posix()
        if rel == "pipeline/core/names.py":
            continue
        for line, literal in spelled_out(path.read_text(), wanted, endings):
            if (rel, literal) not in FOREIGN:
                hits.append(f"{rel}:{line}: {literal}: use a name of pipeline/core/names.py")
    assert not hits, "\n".join(hits)
