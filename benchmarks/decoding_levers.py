"""Decoding levers on a finished run's model: validity and repetition per strategy.

    .venv/bin/python benchmarks/decoding_levers.py            # after `make run`, in the project
    .venv/bin/python benchmarks/decoding_levers.py --model models/pretrain --prompts 50

Issue 15 asks which decoding settings make the model's stories valid (the share the story
world's grammar can produce): beam search's length normalization, the continuation budget
and end-of-text handling, `no_repeat_ngram_size` and a repetition penalty. Each row here
is evaluate's own decoding (`pipeline.eval.decoding.decode_all`: greedy, beam,
temperature, top-k and top-p on the same prompts, seed and budget rule) and its own
scores (`generation_quality`: validity, repetition-4, distinct-2), with one
`evaluate.*` setting changed from params.yaml. Needs a story-world corpus (validity is
the grammar's check) and the run's tokenizer and model. Not a test: it prints a table
for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import Config, load_config  # noqa: E402
from pipeline.core.io import atomic_write_json  # noqa: E402
from pipeline.core.names import TOKENIZER_FILE  # noqa: E402
from pipeline.core.seeding import derive_seed  # noqa: E402
from pipeline.data.eval_inputs import prompts_and_references, story_validator  # noqa: E402
from pipeline.eval.decoding import decode_all, generation_quality  # noqa: E402
from pipeline.model.load import load_model  # noqa: E402
from pipeline.text.shards import read_meta  # noqa: E402
from pipeline.text.tokenizer import load_tokenizer  # noqa: E402

# (name, evaluate.* changes): one lever at a time from params.yaml's evaluate settings.
LEVERS: list[tuple[str, dict]] = [
    ("params.yaml", {}),
    ("beam length_penalty 0 (sum of log-probs)", {"length_penalty": 0.0}),
    ("beam length_penalty 2", {"length_penalty": 2.0}),
    ("beam 8 beams", {"num_beams": 8}),
    ("no_repeat_ngram_size 4", {"no_repeat_ngram_size": 4}),
    ("repetition_penalty 1.2", {"repetition_penalty": 1.2}),
    ("max_new_tokens 64 (the old T//2 budget)", {"max_new_tokens": 64}),
]


def story_config(
    root: Path, overrides: list[str], prompts: int | None, tool: str
) -> tuple[Config, Callable[[str], bool]]:
    """The project's config (with `overrides`; `prompts` replaces evaluate.prompts) and the
    story world's validity check, or a clear exit when the corpus has no story world."""
    cfg = load_config(root, overrides=overrides)
    if prompts:
        cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, prompts=prompts))
    is_valid = story_validator(cfg)
    if is_valid is None:
        raise SystemExit(f"{tool}: validity needs a story-world corpus (validate.sources)")
    return cfg, is_valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project folder")
    parser.add_argument("--model", type=Path, default=None, help="default: paths.finetune")
    parser.add_argument("--prompts", type=int, default=None, help="default: evaluate.prompts")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    cfg, is_valid = story_config(args.root, [], args.prompts, "decoding_levers")
    tok_dir = cfg.path("tokenizer")
    tok, eot = load_tokenizer(tok_dir / TOKENIZER_FILE), read_meta(tok_dir)["eot_id"]
    model = load_model(args.model or cfg.path("finetune"))
    prompts, refs = prompts_and_references(cfg)
    seed = derive_seed(cfg.seed, "evaluate", "decode") % 2**31  # evaluate's decoding seed
    print(f"{len(prompts)} prompts, model {args.model or cfg.path('finetune')}")
    rows = []
    for name, change in LEVERS:
        lever_cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, **change))
        t0 = time.perf_counter()
        gens = decode_all(model, tok, eot, prompts, lever_cfg, seed)
        quality = generation_quality(gens, refs, is_valid)
        secs = time.perf_counter() - t0
        rows.append({"lever": name, "change": change, "seconds": secs, "quality": quality})
        cells = "  ".join(
            f"{s} {q['validity_rate']:.2f}/{q['repetition_4']:.2f}" for s, q in quality.items()
        )
        print(f"{name:42s} validity/repetition-4: {cells}  ({secs:.0f} s)", flush=True)
    if args.out:
        atomic_write_json(args.out, {"prompts": len(prompts), "rows": rows})


if __name__ == "__main__":
    main()
