"""Stage `synthesize`: synthetic pretraining augmentation and the fine-tuning set, both checked.

    dvc repro synthesize
    python -m pipeline.stages.synthesize --set synthesize.synthetic_share=0.3

Reads the validated splits and writes to `paths.synthetic/`:
- `pretrain_train.parquet`: the real training split plus synthetic documents, so that
  `synthesize.synthetic_share` of its bytes is synthetic (source column `synthetic:<gen>`);
- `finetune_train.jsonl`, `finetune_test.jsonl`: the fine-tuning task set (prompt, answer);
- `storyworld.json` (the grammar spec) and `mimic.json` (the fitted n-gram): the exact
  sources, so later stages can compute exact KL against them;
- `config.yaml`: the resolved config.

`reports/synthesize.json` records the story world's entropy rate in bits per byte (the floor
no model can beat), the mimic's, the mix, and the checks every synthetic set must pass: the
same GX suite as the real data, drift against the real corpus, and contamination. The work
is `pipeline/data/synthetic.py`; this module tracks the run and replaces the folder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.config import Config
from pipeline.core.io import atomic_dir, atomic_write_json
from pipeline.core.names import (
    FINETUNE_TEST,
    FINETUNE_TRAIN,
    PRETRAIN_TRAIN,
    report_json,
    split_parquet,
)
from pipeline.data.synthetic import STAGE, read_split, story_world, synthesize_into
from pipeline.ops.stage_runner import stage_entry
from pipeline.ops.tracking import SPLIT_CONTEXT, start_run


def run(cfg: Config) -> dict[str, Any]:
    """Generate, check and write the synthetic sets; GateFailed leaves old outputs intact."""
    train, held_out = read_split(cfg, "train"), read_split(cfg, "val") + read_split(cfg, "test")
    world = story_world(cfg)
    with start_run(cfg, STAGE) as tracker:
        tracker.log_params({"seed": cfg.seed, STAGE: dataclasses.asdict(cfg.synthesize)})
        with atomic_dir(cfg.path("synthetic")) as out:
            report = synthesize_into(cfg, out, world, train, held_out)
        # The report only once the folder it describes is in place (a kill in between
        # leaves the previous report with the previous outputs).
        report_path = atomic_write_json(cfg.path("reports") / report_json(STAGE), report)
        mix = report["mix"]
        tracker.log_metrics({k: v for k, v in mix.items() if not isinstance(v, dict)})
        tracker.log_metrics({"contaminated_fraction": report["contaminated_fraction"]})
        if "source_entropy" in report:
            tracker.log_metrics({"source_entropy": report["source_entropy"]})
        tracker.log_artifact(report_path)
        for split, context in SPLIT_CONTEXT.items():  # read: the real splits it mixes and checks
            path = cfg.path("validated") / split_parquet(split)
            tracker.log_dataset(path, f"validated-{split}", context)
        synth, train, test = cfg.path("synthetic"), SPLIT_CONTEXT["train"], SPLIT_CONTEXT["test"]
        tracker.log_dataset(synth / PRETRAIN_TRAIN, "pretrain-train", train, "output")
        tracker.log_dataset(synth / FINETUNE_TRAIN, "finetune-train", train, "output")
        tracker.log_dataset(synth / FINETUNE_TEST, "finetune-test", test, "output")
        summary = {
            "mix": mix,
            "finetune": report["finetune"],
            "entropy": report.get("source_entropy"),
        }
        tracker.describe(STAGE, summary)
    return summary


# `dvc repro synthesize`; by hand `python -m pipeline.stages.synthesize --set k=v`
main = stage_entry(STAGE, run)

if __name__ == "__main__":
    raise SystemExit(main())
