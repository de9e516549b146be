"""What a registered model ships: its package folder, its code, its requirements and its card.

    python -m pipeline.stages.register     # builds these, then logs and registers them

- `build_package`: the files the served model loads (weights, model config, tokenizer and
  its meta.json, resolved config, decoding defaults); the model card joins them later.
- `serving_code`: the library packages `SERVING_PACKAGES` laid out as `pipeline/<pkg>/`, the
  pyfunc's `code_paths`, so a served model runs without this checkout installed.
- `pip_requirements`: the pinned packages the pyfunc imports.
- `model_card`: the markdown card (`pipeline/serve/model_card.py`) with this model's own
  figures and decoding samples.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_write_json, atomic_write_text
from pipeline.core.names import (
    MODEL_CONFIG_FILE,
    RESOLVED_CONFIG,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
)
from pipeline.serve.card_inputs import CardInputs
from pipeline.serve.model_card import render_model_card
from pipeline.serve.textgen import DEFAULTS_FILE, TextGenerator
from pipeline.text.shards import META_FILE

LIBRARY_DIR = Path(__file__).resolve().parents[1]  # `pipeline/`
PYFUNC_FILE = LIBRARY_DIR / "serve" / "pyfunc_model.py"
# The library packages shipped as the served model's code, and nothing else of `pipeline/`:
# pyfunc_model -> serve.textgen -> model, text, core (the rest of serve/ stays inside these
# too), and config, whose loader reads the package's config.yaml.
SERVING_PACKAGES = ("serve", "model", "text", "config", "core")


def build_package(cfg: Config, dest: Path) -> Path:
    """The files the served model needs: weights, config, tokenizer, decoding defaults.

    The tokenizer's meta.json goes along: it names the end-of-text token the served model
    stops at (pipeline/serve/textgen.py).
    """
    model_dir, tok_dir = cfg.path("finetune"), cfg.path("tokenizer")
    dest.mkdir(parents=True)
    sources = {
        model_dir / MODEL_CONFIG_FILE: "finetune",
        model_dir / WEIGHTS_FILE: "finetune",
        tok_dir / TOKENIZER_FILE: "tokenizer",
        tok_dir / META_FILE: "tokenizer",
    }
    for src, stage in sources.items():
        if not src.is_file():
            raise LmforgeError(f"{src}: not found; run `dvc repro {stage}` first")
        shutil.copy2(src, dest / src.name)
    atomic_write_text(dest / RESOLVED_CONFIG, cfg.to_yaml())
    defaults = {**dataclasses.asdict(cfg.register.decoding), "return_full_text": True}
    atomic_write_json(dest / DEFAULTS_FILE, defaults)
    return dest


def serving_code(dest: Path) -> Path:
    """`dest/pipeline/` holding `SERVING_PACKAGES` (no caches): the served model's code.

    Laid out as `pipeline/<pkg>/`, so `import pipeline.serve.textgen` works where MLflow
    puts the model's code folder on `sys.path`.
    """
    root = dest / "pipeline"
    root.mkdir(parents=True)
    shutil.copy2(LIBRARY_DIR / "__init__.py", root / "__init__.py")
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in SERVING_PACKAGES:
        shutil.copytree(LIBRARY_DIR / pkg, root / pkg, ignore=skip)
    return root


def pip_requirements() -> list[str]:
    """Pinned runtime requirements of the served model: what the pyfunc imports."""
    from importlib.metadata import version

    pkgs = ("mlflow", "torch", "tokenizers", "safetensors", "numpy", "pyyaml")
    return [f"{p}=={version(p).split('+')[0]}" for p in pkgs]


def card_samples(cfg: Config, generator: TextGenerator) -> list[tuple[str, str]]:
    """(prompt, generation) pairs with the served defaults, on the evaluation's prompts."""
    from pipeline.data.eval_inputs import prompts_and_references

    n = cfg.register.card_samples
    if n == 0:
        return []
    prompts, _ = prompts_and_references(cfg)
    prompts = prompts[:n]
    return list(zip(prompts, generator.complete(prompts), strict=True))


def model_card(
    cfg: Config,
    generator: TextGenerator,
    gate: dict[str, Any],
    lineage: dict[str, str],
    timing: dict[str, float],
) -> str:
    """The markdown model card from the stage reports, this model and its lineage."""
    inputs = CardInputs(
        cfg=cfg,
        model_config=json.loads((cfg.path("finetune") / MODEL_CONFIG_FILE).read_text()),
        num_params=generator.model.num_params(exclude_position=False),
        samples=card_samples(cfg, generator),
        gate=gate,
        lineage=lineage,
        timing=timing,
    )
    return render_model_card(inputs)
