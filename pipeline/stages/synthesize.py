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
same GX suite as the real data, drift against the real corpus, and contamination.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, save_resolved
from pipeline.core.errors import GateFailed
from pipeline.core.io import atomic_dir, atomic_write_json, atomic_write_text
from pipeline.core.names import (
    FINETUNE_TEST,
    FINETUNE_TRAIN,
    MIMIC,
    PRETRAIN_TRAIN,
    STORYWORLD,
    failed_report,
    report_json,
    split_parquet,
)
from pipeline.core.seeding import derive_seed
from pipeline.data.clean import CorpusScan, normalize
from pipeline.data.drift import NGramIndex, length_distance, unigram_kl
from pipeline.data.expectations import GateThresholds, run_gate
from pipeline.data.finetune_set import (
    Example,
    continuation_examples,
    qa_examples,
    split_examples,
)
from pipeline.data.ingest import SCHEMA, storyworld_spec
from pipeline.data.ngram import NGramModel
from pipeline.ops.stage_runner import stage_main
from pipeline.ops.tracking import start_run

log = logging.getLogger(__name__)
STAGE = "synthesize"


def read_split(cfg: Config, split: str) -> list[str]:
    path = cfg.path("validated") / split_parquet(split)
    if not path.is_file():
        raise GateFailed(f"{path}: validated split not found; run `dvc repro validate` first")
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def uses_storyworld(cfg: Config) -> bool:
    return any(s.kind == "storyworld" for s in cfg.validate.sources)


def doc_stream(gen: str, world, mimic, seed: int, max_chars: int) -> Iterator[str]:
    """An endless, seeded stream of synthetic documents from one generator."""
    if gen == "storyworld":
        rng = random.Random(seed)
        while True:
            yield world.sample(rng).text
    rng_np = np.random.default_rng(seed)
    while True:
        yield mimic.sample(rng_np, max_chars)


def generate_augmentation(
    cfg: Config, world, mimic, real_bytes: int
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Synthetic docs per generator, in equal byte shares, reaching the configured share.

    Documents are normalized like the real corpus, and those outside the real corpus's
    length bounds are rejected (counted in the second return value), so that the synthetic
    set meets the same GX suite; for the mimic this conditions its distribution on length.
    """
    s, v = cfg.synthesize, cfg.validate
    target = s.synthetic_share / (1 - s.synthetic_share) * real_bytes
    per_gen_bytes = target / max(len(s.generators), 1)
    per_gen_docs = s.max_synthetic_docs // max(len(s.generators), 1)
    out: dict[str, list[str]] = {}
    rejected: dict[str, int] = {}
    for gen in s.generators:
        seed = derive_seed(cfg.seed, STAGE, "augment", gen)
        docs, size, rejected[gen] = [], 0, 0
        stream = doc_stream(gen, world, mimic, seed, s.mimic.max_chars)
        while size < per_gen_bytes and len(docs) < per_gen_docs:
            doc = normalize(next(stream), v.strip_whitespace)
            if not v.min_chars <= len(doc) <= v.max_chars:
                rejected[gen] += 1
                continue
            docs.append(doc)
            size += len(doc.encode("utf-8"))
        out[gen] = docs
        log.info("synthesize: %s generated %d docs, %.2f MB", gen, len(docs), size / 1e6)
    return out, rejected


def drop_contaminated(docs: list[str], index: NGramIndex) -> tuple[list[str], dict[str, Any]]:
    """Remove docs that equal, or share a long n-gram with, a val/test doc."""
    report = index.find_leaks(docs)
    leaked = {ex.doc_index for ex in report.examples}
    if report.contaminated > len(leaked):  # examples are capped: find every leak one by one
        leaked = {i for i, d in enumerate(docs) if index.find_leaks([d]).contaminated}
    kept = [d for i, d in enumerate(docs) if i not in leaked]
    return kept, report.to_dict()


def check_synthetic(cfg: Config, docs: list[str], label: str, real: list[str]) -> dict[str, Any]:
    """Run the real data's GX suite and the drift checks on one synthetic set."""
    scan = CorpusScan(cfg.validate, derive_seed(cfg.seed, STAGE, "gx", label))
    table = pa.table(
        {
            "text": docs,
            "source": [label] * len(docs),
            "doc_id": [f"{label}:{i}" for i in range(len(docs))],
        },
        schema=SCHEMA,
    )
    scan.add(table)
    # Same thresholds as the real corpus, except its size bounds, which a sample need not meet.
    gate_cfg = dataclasses.replace(
        GateThresholds.from_params(cfg.validate), min_rows=1, min_rows_per_source=1
    )
    gate = run_gate(scan.sample_frame(), scan.aggregates(), gate_cfg, None)
    drift = {
        "unigram_kl_bits": unigram_kl(docs, real),
        "length_distance": length_distance(
            [len(d.encode()) for d in docs], [len(d.encode()) for d in real]
        ),
    }
    failures = [] if gate.success else [gate.failure_message()]
    s = cfg.synthesize
    if drift["unigram_kl_bits"] > s.max_unigram_kl:
        failures.append(
            f"synthesize.max_unigram_kl: {label} unigram KL {drift['unigram_kl_bits']:.4f} bits "
            f"> {s.max_unigram_kl}"
        )
    if drift["length_distance"] > s.max_length_distance:
        failures.append(
            f"synthesize.max_length_distance: {label} length distance "
            f"{drift['length_distance']:.4f} > {s.max_length_distance}"
        )
    return {
        "gx_success": gate.success,
        "gx": gate.expectations,
        "drift": drift,
        "failures": failures,
    }


def build_finetune(cfg: Config, world, train_docs: list[str]) -> list[Example]:
    s, seed = cfg.synthesize, derive_seed(cfg.seed, STAGE, "finetune")
    if world is not None:
        return qa_examples(world, s.finetune_docs, seed)
    return continuation_examples(train_docs, s.finetune_docs, s.continuation_chars, seed)


def write_jsonl(path: Path, examples: list[Example]) -> None:
    atomic_write_text(
        path, "".join(json.dumps(e.to_dict(), sort_keys=True) + "\n" for e in examples)
    )


def write_mix(path: Path, real: list[str], synthetic: dict[str, list[str]]) -> None:
    texts, sources = list(real), ["real"] * len(real)
    for gen, docs in synthetic.items():
        texts += docs
        sources += [f"synthetic:{gen}"] * len(docs)
    ids = [f"{src}:{i}" for i, src in enumerate(sources)]
    pq.write_table(pa.table({"text": texts, "source": sources, "doc_id": ids}, schema=SCHEMA), path)


def synthesize_into(cfg: Config, out: Path, world, train: list[str], held_out: list[str]):
    """Do the stage's work into folder `out`; return the report. Raises GateFailed."""
    s = cfg.synthesize
    report: dict[str, Any] = {"generators": list(s.generators)}
    if world is not None:
        est = world.entropy_rate(s.entropy_docs, derive_seed(cfg.seed, STAGE, "entropy"))
        report["source_entropy"] = dataclasses.asdict(est)
        atomic_write_json(out / STORYWORLD, dataclasses.asdict(cfg.storyworld))
    mimic = None
    if "mimic" in s.generators:
        m = s.mimic
        mimic = NGramModel(m.order, m.smoothing, m.k, m.discount).fit(train)
        mimic.save(out / MIMIC)
        sample = mimic.generate(200, derive_seed(cfg.seed, STAGE, "mimic-entropy"), m.max_chars)
        report["mimic"] = {
            "order": m.order,
            "bits_per_byte_own_samples": mimic.bits_per_byte(sample),
        }
    real_bytes = sum(len(d.encode("utf-8")) for d in train)
    synthetic, rejected = generate_augmentation(cfg, world, mimic, real_bytes)
    index = NGramIndex(held_out, n=s.contamination_ngram)
    checks, failures, total, dropped = {}, [], 0, 0
    for gen, docs in synthetic.items():
        kept, leaks = drop_contaminated(docs, index)
        total, dropped = total + len(docs), dropped + len(docs) - len(kept)
        synthetic[gen] = kept
        checks[gen] = {"contamination": leaks, **check_synthetic(cfg, kept, gen, train)}
        failures += checks[gen].pop("failures")
    examples = build_finetune(cfg, world, train)
    kept_ctx, ft_leaks = drop_contaminated([e.context for e in examples], index)
    examples = [e for e in examples if e.context in set(kept_ctx)]
    total, dropped = total + ft_leaks["n_docs"], dropped + ft_leaks["contaminated"]
    checks["finetune"] = {"contamination": ft_leaks}
    report["checks"] = checks
    report["contaminated_fraction"] = frac = dropped / max(total, 1)
    if frac > s.max_contaminated_fraction:
        failures.append(
            f"synthesize.max_contaminated_fraction: {frac:.4f} of synthetic docs overlap "
            f"val/test (limit {s.max_contaminated_fraction})"
        )
    if failures:
        path = atomic_write_json(cfg.path("reports") / failed_report(STAGE), report)
        raise GateFailed("\n".join(failures) + f"\nfull report: {path}")
    ft_train, ft_test = split_examples(examples, s.finetune_test_fraction)
    write_jsonl(out / FINETUNE_TRAIN, ft_train)
    write_jsonl(out / FINETUNE_TEST, ft_test)
    write_mix(out / PRETRAIN_TRAIN, train, synthetic)
    save_resolved(cfg, out)
    synth_bytes = sum(len(d.encode("utf-8")) for docs in synthetic.values() for d in docs)
    report["mix"] = {
        "real_bytes": real_bytes,
        "synthetic_bytes": synth_bytes,
        "synthetic_share_bytes": synth_bytes / max(real_bytes + synth_bytes, 1),
        "synthetic_docs": {g: len(d) for g, d in synthetic.items()},
        "rejected_for_length": rejected,
    }
    report["finetune"] = {
        "kind": examples[0].kind if examples else "none",
        "train_examples": len(ft_train),
        "test_examples": len(ft_test),
    }
    return report


def run(cfg: Config) -> dict[str, Any]:
    """Generate, check and write the synthetic sets; GateFailed leaves old outputs intact."""
    from pipeline.data.storyworld import StoryWorld

    train, held_out = read_split(cfg, "train"), read_split(cfg, "val") + read_split(cfg, "test")
    needs_world = uses_storyworld(cfg) or "storyworld" in cfg.synthesize.generators
    world = StoryWorld(storyworld_spec(cfg)) if needs_world else None
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
        synth = cfg.path("synthetic")
        tracker.log_dataset(synth / PRETRAIN_TRAIN, "pretrain-train", "train")
        tracker.log_dataset(synth / FINETUNE_TRAIN, "finetune-train", "finetune")
    return {"mix": mix, "finetune": report["finetune"], "entropy": report.get("source_entropy")}


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
