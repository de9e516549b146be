"""Stage `evaluate`: how good the fine-tuned model is, measured against what is known exactly.

    dvc repro evaluate
    python -m pipeline.stages.evaluate --set evaluate.prompts=50

Reports, into `reports/evaluate.json` (DVC metrics), `reports/evaluate.md` and MLflow:
- held-out test split: cross-entropy, perplexity, bits per byte (over the exact bytes of
  the scored tokens), loss by position;
- against the true source: the KL rate in bits per byte with a confidence interval, on
  fresh story-world documents (and n-gram mimic documents when synthesize fitted one),
  from the source's exact log-probabilities: model bits/byte minus source entropy rate;
  every document is scored whole, with sliding windows when it is longer than the
  model's context (`multi_window_docs` counts those);
- calibration on the test split: ECE with a reliability diagram, Brier score, entropy;
- sharpness of each fine-tuning method's final weights (epsilon-sharpness, the largest and
  smallest Hessian eigenvalues by Lanczos) on the same test batches, with sentences saying
  what they show;
- decoding per strategy (greedy, beam, temperature, top-k, top-p): distinct-n, repetition,
  MMD and k-NN precision/recall against held-out text, and for story-world prompts the
  validity rate (the share of generations the grammar can produce: 1 - hallucination rate);
- classical baselines on the whole test split (`pipeline/data/baselines.py`): the n-gram
  with the mimic's settings, a unigram and `xz -9`, fitted on or conditioned on the real
  training split, and the model's gain over the n-gram (the register gate's relative check);
- the fine-tuning test split: answer loss in bits per byte, and exact-match accuracy on the
  story world's questions (a real-text continuation has no single right answer).

The measurements live in the torch-only `pipeline/eval` (scoring, calibration, flatness,
decoding, report); what they are measured on (fresh source documents with their exact
log-probabilities, prompts, references, the grammar's check) in `pipeline/data/eval_inputs.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.config import Config
from pipeline.core.io import atomic_write_json, atomic_write_text
from pipeline.core.names import (
    FINETUNE_TEST,
    LOSS_BY_POSITION,
    PLOTS_DIR,
    RELIABILITY,
    TOKENIZER_FILE,
    report_json,
    report_md,
    split_parquet,
)
from pipeline.core.plots import loss_by_position_png
from pipeline.core.progress import Progress
from pipeline.core.seeding import derive_seed
from pipeline.data.baselines import classical_baselines
from pipeline.data.eval_inputs import exact_sources, prompts_and_references, story_validator
from pipeline.data.synthetic import finetune_kind
from pipeline.eval.calibration import reliability_png
from pipeline.eval.decoding import decode_all, generation_quality, sampling_filters, task_scores
from pipeline.eval.flatness import sharpness_table
from pipeline.eval.report import flat_numbers, markdown
from pipeline.eval.scoring import source_kl, test_scores
from pipeline.eval.sharpness import flatness_verdict
from pipeline.model.load import load_model
from pipeline.ops.stage_runner import stage_entry
from pipeline.text.shards import check_text_bytes, read_meta, read_shard
from pipeline.text.tokenizer import load_tokenizer, token_byte_lengths

log = logging.getLogger(__name__)
STAGE = "evaluate"


# The stage's parts, in order: its progress line counts them ("evaluate: 3 parts / 7 parts").
PARTS = (
    "fresh source documents",
    "test split",
    "task",
    "classical baselines",
    "KL to the sources",
    "every method's sharpness",
    "decoding",
)


@contextlib.contextmanager
def part(progress: Progress, name: str) -> Iterator[None]:
    """Log one part of the stage with its seconds, then count it on the progress line:
    without them the stage would print nothing for a minute (about 80 s on 2 cores)."""
    start = time.perf_counter()
    yield
    log.info("%s: %s took %.1f s", STAGE, name, time.perf_counter() - start)
    progress.update(1)


def run(cfg: Config) -> dict[str, Any]:
    """Evaluate the fine-tuned model; write reports/evaluate.{json,md} and plots."""
    from pipeline.ops.tracking import SPLIT_CONTEXT, start_run

    torch.manual_seed(derive_seed(cfg.seed, STAGE, "torch") % 2**63)
    tok_dir = cfg.path("tokenizer")
    meta, tok = read_meta(tok_dir), load_tokenizer(tok_dir / TOKENIZER_FILE)
    eot, test_meta = meta["eot_id"], meta["splits"]["test"]
    test_tokens = read_shard(tok_dir / test_meta["file"], test_meta)
    token_bytes = token_byte_lengths(tok)  # (V,) exact bytes per id, separators 0
    check_text_bytes(tok_dir / test_meta["file"], test_tokens, token_bytes, test_meta["bytes"])
    model = load_model(cfg.path("finetune"))
    e = cfg.evaluate
    with start_run(cfg, STAGE) as tracker:
        tracker.log_params({"seed": cfg.seed, STAGE: dataclasses.asdict(e)})
        progress = Progress(STAGE, total=len(PARTS), unit=" parts", every=0.0)
        report: dict[str, Any] = {}
        with part(progress, "fresh source documents"):
            # Fresh documents of the exact sources, with their code lengths under the source.
            seed = derive_seed(cfg.seed, STAGE, "fresh-source")
            sources = exact_sources(cfg, e.source_docs, seed)
        with part(progress, "test split"):
            report["test"] = test = test_scores(
                model, test_tokens, cfg, torch.from_numpy(token_bytes)
            )
        with part(progress, "task"):
            report["task"] = task = task_scores(model, tok, eot, cfg, finetune_kind(cfg))
            report["task_accuracy"] = (task or {}).get("exact_match")  # None: continuations
        with part(progress, "classical baselines"):
            # Every full window scored: the baselines then score the same text (bar one tail).
            whole = test["tokens_scored"] > len(test_tokens) - 1 - model.config.block_size
            report["baselines"] = classical_baselines(cfg, test["bits_per_byte"], whole)
        with part(progress, "KL to the sources"):
            filters = sampling_filters(cfg)
            report["source_kl"] = source_kl(model, tok, eot, sources, filters)
        with part(progress, "every method's sharpness"):
            seed = derive_seed(cfg.seed, STAGE, "sharpness")
            report["sharpness"] = sharpness_table(cfg, test_tokens, seed)
            # What the numbers show, "NOT flatter" included: the sentences finetune writes.
            report["flatness"] = flatness_verdict(report["sharpness"])
        with part(progress, "decoding"):
            prompts, refs = prompts_and_references(cfg)
            decode_seed = derive_seed(cfg.seed, STAGE, "decode") % 2**31
            gens = decode_all(model, tok, eot, prompts, cfg, decode_seed)
            report["generation"] = generation_quality(gens, refs, story_validator(cfg))
        progress.close()
        reports = cfg.path("reports")
        atomic_write_text(reports / report_md(STAGE), markdown(report, gens, e.samples_in_report))
        by_position = report["test"].pop("loss_by_position")  # (T,) mean nats per position
        atomic_write_json(
            reports / PLOTS_DIR / LOSS_BY_POSITION,
            [{"position": i, "loss": v} for i, v in enumerate(by_position)],
        )
        diagram = report["test"]["calibration"].pop("diagram")
        atomic_write_json(reports / PLOTS_DIR / RELIABILITY, diagram)
        atomic_write_json(reports / report_json(STAGE), report)
        tracker.log_metrics(flat_numbers(report))
        for name in (report_md(STAGE), report_json(STAGE)):
            tracker.log_artifact(reports / name)
        pngs = (
            reliability_png(diagram, reports / PLOTS_DIR / "reliability.png"),
            loss_by_position_png(by_position, reports / PLOTS_DIR / "loss_by_position.png"),
        )
        for png in filter(None, pngs):  # None: matplotlib is not installed
            tracker.log_artifact(png, "plots")
        ctx = SPLIT_CONTEXT  # what it scored: the test shard and the held-out task set
        tracker.log_dataset(tok_dir / test_meta["file"], "tokens-test", ctx["test"])
        if (task_set := cfg.path("synthetic") / FINETUNE_TEST).is_file():  # else no accuracy
            tracker.log_dataset(task_set, "finetune-test", ctx["test"])
        for split in ("train", "test"):  # what the baselines were fitted on and scored
            path = cfg.path("validated") / split_parquet(split)
            tracker.log_dataset(path, f"validated-{split}", ctx[split])
        summary = {
            "bits_per_byte": report["test"]["bits_per_byte"],
            "gain_over_ngram": report["baselines"]["gain_over_ngram"],
            "kl": {k: v["kl_bits_per_byte"] for k, v in report["source_kl"].items()},
        }
        tracker.describe(STAGE, summary)
    return summary


# `dvc repro evaluate`; by hand `python -m pipeline.stages.evaluate --set k=v`
main = stage_entry(STAGE, run)

if __name__ == "__main__":
    raise SystemExit(main())
