"""Every shipped preset runs the whole chain, at `ci` sizes with its own sources.

`ci` (and `default`, which only differs by sizes) is run end to end by
tests/test_pipeline_e2e.py through Prefect and DVC. The other presets change the sources and
the synthetic mix; here each runs all seven stages in process (the chain's logic, without
the orchestration the e2e test covers) with every size of `presets/ci.yaml` on top. A
preset's own sources and synthetic mix stay as shipped: a file it reads at a relative path
gets a stand-in of the same layout at that path, since tests must not depend on `../shared`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cfg_for, make_project

from pipeline.core.nested import flatten
from pipeline.stages import (
    evaluate,
    finetune,
    pretrain,
    register,
    synthesize,
    tokenizer,
    validate,
)

CHAIN = [validate, synthesize, tokenizer, pretrain, finetune, evaluate, register]
E2E_ELSEWHERE = {"ci", "default"}  # tests/test_pipeline_e2e.py
SHIPPED = sorted(p.stem for p in (REPO / "presets").glob("*.yaml"))

NAMES = ["ROMEO", "JULIET", "MERCUTIO", "NURSE", "FRIAR LAURENCE", "TYBALT"]
VERSE = (
    "thou art the sun and i the moon that wanes in sorrow; what light through yonder "
    "window breaks? it is the east, and love doth speak in whispers to the night"
)


def play_text(n_speeches: int, seed: int = 0) -> str:
    """A stand-in for tinyshakespeare: `NAME:` then one to four lines, blank-line separated."""
    rng, words, speeches = random.Random(seed), VERSE.split(), []
    for _ in range(n_speeches):
        lines = [" ".join(rng.choices(words, k=rng.randint(5, 10))).capitalize() + "."]
        for _ in range(rng.randint(0, 3)):
            lines.append(" ".join(rng.choices(words, k=rng.randint(4, 9))))
        speeches.append(f"{rng.choice(NAMES)}:\n" + "\n".join(lines))
    return "\n\n".join(speeches) + "\n"


# What `ci` reads and mixes rather than how much: each preset keeps its own choice.
DATA_CHOICES = {"validate": ["sources"], "synthesize": ["generators", "synthetic_share"]}


def ci_sizes() -> list[str]:
    """`presets/ci.yaml` as --set overrides, its data choices left out."""
    ci = yaml.safe_load((REPO / "presets" / "ci.yaml").read_text())
    for section, keys in DATA_CHOICES.items():
        for key in keys:
            ci.get(section, {}).pop(key, None)
    return [f"{k}={json.dumps(v)}" for k, v in flatten(ci, lists="keep").items()]


def stand_in_sources(root: Path, preset: str) -> None:
    """Files the preset reads, made at its relative paths with the layout it expects."""
    shipped = yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())
    for src in shipped.get("validate", {}).get("sources", []):
        if src["kind"] != "txt" or Path(src["path"]).is_absolute():
            pytest.fail(f"presets/{preset}.yaml: no stand-in for source {src}")
        path = root / src["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(play_text(1500))


@pytest.mark.parametrize("preset", sorted(set(SHIPPED) - E2E_ELSEWHERE))
def test_shipped_preset_runs_every_stage_at_ci_sizes(preset, tmp_path):
    root = make_project(tmp_path / "proj", preset=preset, overrides=ci_sizes())
    stand_in_sources(root, preset)
    cfg = cfg_for(root)
    shipped = yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())
    for key in DATA_CHOICES["synthesize"]:  # the preset's mix, not ci's
        if key in shipped.get("synthesize", {}):
            assert getattr(cfg.synthesize, key) == shipped["synthesize"][key], key
    for stage in CHAIN:
        stage.run(cfg)
    reports = cfg.path("reports")
    ev = json.loads((reports / "evaluate.json").read_text())
    # Real text: the n-gram baseline is scored, and the task is a continuation loss.
    assert ev["baselines"]["ngram"]["bits_per_byte"] > 0
    assert ev["task"]["kind"] == "continuation" and ev["task_accuracy"] is None
    assert ev["task"]["answer_bits_per_byte"] > 0
    gate = json.loads((reports / "register.json").read_text())["gate"]
    assert gate["passed"], gate
    assert "task_accuracy" not in [c["name"] for c in gate["checks"]]


def test_the_presets_left_to_the_e2e_test_only_differ_in_sizes():
    """`default` reads what `ci` reads, so the e2e run of `ci` covers its sources."""

    def kinds(preset: str) -> list[str]:
        data = yaml.safe_load((REPO / "presets" / f"{preset}.yaml").read_text())
        return [s["kind"] for s in data["validate"]["sources"]]

    assert set(SHIPPED) >= E2E_ELSEWHERE
    assert kinds("default") == kinds("ci") == ["storyworld"]
