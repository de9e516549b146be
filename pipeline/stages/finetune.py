"""Stage `finetune`: SWA and/or SAM fine-tuning from the pretrained weights.

    dvc repro finetune
    python -m pipeline.stages.finetune --set finetune.method=sam --set finetune.compare=false

Fine-tuning runs as one process (dvc.yaml runs this module with plain `python`, not
torchrun), on the GPU when there is one, else on the CPU, in the dtype pretraining resolved
to (bf16 autocast on CUDA and on CPUs with native bf16; `pretrain.dtype`).

Methods (`finetune.method`): `adamw` (the baseline), `sam`, `swa` and `sam+swa`; the data
(`finetune.data`) and the training loop are in pipeline/train/finetune.py.

With `finetune.compare: true` every method starts from the same checkpoint and sees the
same batches in the same order (batches are a function of the step). adamw and sam are not
re-run over the steps before `finetune.swa_start`, where they are swa and sam+swa (bit for
bit on CPU): they go on from those runs' state there (`train_methods`). `reports/finetune.json`,
`reports/finetune.md` and a plot compare held-out answer loss, task accuracy (greedy exact
match) and flatness: epsilon-sharpness and the largest and smallest Hessian eigenvalues
(Lanczos, with residuals; a negative smallest one means the weights are not at a minimum),
followed by sentences generated from those numbers that say whether each method is flatter
than adamw, or NOT, by each measure (`flatness` in the JSON; pipeline/eval/comparison.py).
The model of `finetune.method` moves on, in `paths.finetune/model.safetensors`; with
compare, every method's weights are kept in `paths.finetune/methods/<method>/` for
evaluation. In MLflow the run's `plots/` has each method's training loss curve on one
chart, ending at its held-out loss, and the comparison chart, which also goes onto the
pipeline's parent run when the stage runs under the flow.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import Config, save_resolved
from pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text
from pipeline.core.names import (
    FINETUNE_TEST,
    FINETUNE_TRAIN,
    METHODS_DIR,
    MODEL_CONFIG_FILE,
    PLOTS_DIR,
    WEIGHTS_FILE,
    report_json,
    report_md,
)
from pipeline.eval.comparison import (
    comparison_chart,
    comparison_markdown,
    comparison_report,
    loss_chart,
    measure,
)
from pipeline.ops.stage_runner import stage_entry
from pipeline.train import checkpoint as ckpt
from pipeline.train.finetune import (
    METHODS,
    finetune_device,
    finetune_dtype,
    load_data,
    load_pretrained,
    train_methods,
)
from pipeline.train.precision import dtype_name

log = logging.getLogger(__name__)
STAGE = "finetune"
__all__ = ["METHODS", "STAGE", "main", "run"]


def run(cfg: Config) -> dict[str, Any]:
    """Fine-tune with the configured method (and the others when comparing)."""
    from pipeline.ops.tracking import SPLIT_CONTEXT, start_run

    f, device = cfg.finetune, finetune_device(cfg)
    gcfg, weights = load_pretrained(cfg)
    data = load_data(cfg, gcfg, device)
    methods = list(METHODS) if f.compare else [f.method]
    results: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, float]]] = {m: [] for m in methods}  # per-step loss
    with start_run(cfg, STAGE) as tracker:
        dtype = finetune_dtype(cfg, device)  # pretraining's: bf16 on CUDA and native-bf16 CPUs
        log.info("finetune: %s, %s", device.type, dtype)
        tracker.log_params(
            {"seed": cfg.seed, STAGE: dataclasses.asdict(f), "compute_dtype": dtype_name(dtype)}
        )
        with atomic_dir(cfg.path("finetune")) as out:
            # swa then adamw, which goes on from swa's run at swa_start; sam+swa then sam.
            trained = train_methods(methods, cfg, gcfg, weights, data, device, histories)
            for method, model in trained:
                results[method] = measure(model, data, cfg)
                log.info("finetune[%s]: %s", method, results[method])
                if method == f.method:
                    ckpt.save_weights(out / WEIGHTS_FILE, model.state_dict())
                if f.compare:  # every method's weights, for evaluate's sharpness table
                    (out / METHODS_DIR / method).mkdir(parents=True)
                    ckpt.save_weights(out / METHODS_DIR / method / WEIGHTS_FILE, model.state_dict())
            atomic_write_json(out / MODEL_CONFIG_FILE, dataclasses.asdict(gcfg))
            save_resolved(cfg, out)
        results = {m: results[m] for m in methods}  # reports list them in METHODS order
        # Reports last, once the weights they describe are in place.
        report = comparison_report(results, f.method, f.compare)
        reports = cfg.path("reports")
        atomic_write_text(reports / report_md(STAGE), comparison_markdown(results, f.method))
        atomic_write_json(reports / report_json(STAGE), report)
        for method, r in results.items():
            tracker.log_metrics({f"{method}.{k}": v for k, v in r.items()})
        tracker.log_artifact(reports / report_md(STAGE))
        png = comparison_chart(results, reports / PLOTS_DIR / "finetune_compare.png")
        if png:
            tracker.log_artifact(png, "plots")
            tracker.log_artifact_on_parent(png, "plots")  # the pipeline's overview shows it
        if tracker.active:  # the loss curves are for MLflow only: no DVC output, no file kept
            with tempfile.TemporaryDirectory() as tmp:
                png = loss_chart(histories, results, Path(tmp) / "finetune_loss.png")
                if png:
                    tracker.log_artifact(png, "plots")
        synth = cfg.path("synthetic")  # the fine-tuning set: trained on, and held out
        tracker.log_dataset(synth / FINETUNE_TRAIN, "finetune-train", SPLIT_CONTEXT["train"])
        tracker.log_dataset(synth / FINETUNE_TEST, "finetune-test", SPLIT_CONTEXT["test"])
        tracker.describe(STAGE, report)
    return report


# `dvc repro finetune`; by hand `python -m pipeline.stages.finetune --set k=v`
main = stage_entry(STAGE, run)

if __name__ == "__main__":
    raise SystemExit(main())
