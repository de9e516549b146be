"""The synthesize stage's work: synthetic pretraining data and the fine-tuning set, both checked.

    python -m pipeline.stages.synthesize     # the stage (pipeline/stages/synthesize.py)

`synthesize_into` writes into a folder (the stage hands it a temporary one that replaces
`paths.synthetic/` atomically) the files the stage's docstring lists: the pretraining mix
(real training split plus synthetic documents, `synthesize.synthetic_share` of its bytes),
the fine-tuning task set split into train and test, the exact sources (story-world spec,
fitted n-gram mimic) and the resolved config.

Every synthetic set must pass the checks of the real data: the same GX suite, drift
against the real corpus (unigram KL, length distance), and contamination (no document
equal to, or sharing a long n-gram with, a val/test document). Any failure raises
GateFailed after writing `reports/synthesize.failed.json`. Every random choice is seeded
from `seed` and the stage's name (`derive_seed(seed, "synthesize", ...)`), so a re-run is
byte-identical.
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
from pipeline.core.io import atomic_write_json, atomic_write_text
from pipeline.core.names import (
    FINETUNE_TEST,
    FINETUNE_TRAIN,
    MIMIC,
    PRETRAIN_TRAIN,
    STORYWORLD,
    failed_report,
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

log = logging.getLogger(__name__)
# The stage's name: every seed here derives from it (renaming it changes every output), and
# the failure report is named after it.
STAGE = "synthesize"


def read_split(cfg: Config, split: str) -> list[str]:
    """The texts of validated split `split`; a missing split is a clear error."""
    path = cfg.path("validated") / split_parquet(split)
    if not path.is_file():
        raise GateFailed(f"{path}: validated split not found; run `dvc repro validate` first")
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def uses_storyworld(cfg: Config) -> bool:
    return any(s.kind == "storyworld" for s in cfg.validate.sources)


def needs_story_world(cfg: Config) -> bool:
    """Whether a source or a generator draws from the story world."""
    return uses_storyworld(cfg) or "storyworld" in cfg.synthesize.generators


def finetune_kind(cfg: Config) -> str:
    """The fine-tuning task `build_finetune` makes: "qa" on the story world, else "continuation"."""
    return "qa" if needs_story_world(cfg) else "continuation"


def story_world(cfg: Config) -> Any | None:
    """The story world (a `storyworld.StoryWorld`) when a source or generator uses it."""
    if not needs_story_world(cfg):
        return None
    from pipeline.data.storyworld import StoryWorld  # only the story world needs the grammar

    return StoryWorld(storyworld_spec(cfg))


def utf8_bytes(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


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


def drift_failures(cfg: Config, label: str, drift: dict[str, float]) -> list[str]:
    """A message per drift figure of set `label` above its `synthesize.max_*` limit."""
    s, failures = cfg.synthesize, []
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
    return failures


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
    return {
        "gx_success": gate.success,
        "gx": gate.expectations,
        "drift": drift,
        "failures": failures + drift_failures(cfg, label, drift),
    }


def check_augmentation(
    cfg: Config, synthetic: dict[str, list[str]], index: NGramIndex, real: list[str]
) -> tuple[dict[str, list[str]], dict[str, Any], list[str]]:
    """(kept docs per generator, checks per generator, failure messages).

    Each generator's contaminated docs are dropped first; the GX suite and the drift checks
    then run on what is kept, which is what the pretraining mix receives.
    """
    kept_sets: dict[str, list[str]] = {}
    checks: dict[str, Any] = {}
    failures: list[str] = []
    for gen, docs in synthetic.items():
        kept, leaks = drop_contaminated(docs, index)
        kept_sets[gen] = kept
        if not kept:  # synthetic_share or max_synthetic_docs 0, or every doc leaked
            checks[gen] = {"contamination": leaks, "checked": "no documents to check"}
            continue
        checks[gen] = {"contamination": leaks, **check_synthetic(cfg, kept, gen, real)}
        failures += checks[gen].pop("failures")
    return kept_sets, checks, failures


def build_finetune(cfg: Config, world, train_docs: list[str]) -> list[Example]:
    s, seed = cfg.synthesize, derive_seed(cfg.seed, STAGE, "finetune")
    if world is not None:
        return qa_examples(world, s.finetune_docs, seed)
    return continuation_examples(train_docs, s.finetune_docs, s.continuation_chars, seed)


def drop_contaminated_examples(
    examples: list[Example], index: NGramIndex
) -> tuple[list[Example], dict[str, Any]]:
    """The examples whose context leaks nothing of val/test, and the contamination report."""
    kept_ctx, leaks = drop_contaminated([e.context for e in examples], index)
    kept = set(kept_ctx)
    return [e for e in examples if e.context in kept], leaks


def write_exact_sources(
    cfg: Config, out: Path, world, train: list[str]
) -> tuple[NGramModel | None, dict[str, Any]]:
    """`storyworld.json` and `mimic.json` (the generators' exact sources) into `out`.

    Returns the fitted mimic (None when it is not a generator) and the report's entries:
    the story world's entropy rate (the floor no model can beat) and the mimic's bits per
    byte on its own samples.
    """
    s, entries = cfg.synthesize, {}
    if world is not None:
        est = world.entropy_rate(s.entropy_docs, derive_seed(cfg.seed, STAGE, "entropy"))
        entries["source_entropy"] = dataclasses.asdict(est)
        atomic_write_json(out / STORYWORLD, dataclasses.asdict(cfg.storyworld))
    if "mimic" not in s.generators:
        return None, entries
    m = s.mimic
    mimic = NGramModel(m.order, m.smoothing, m.k, m.discount).fit(train)
    mimic.save(out / MIMIC)
    sample = mimic.generate(200, derive_seed(cfg.seed, STAGE, "mimic-entropy"), m.max_chars)
    entries["mimic"] = {"order": m.order, "bits_per_byte_own_samples": mimic.bits_per_byte(sample)}
    return mimic, entries


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


def mix_report(
    real_bytes: int, synthetic: dict[str, list[str]], rejected: dict[str, int]
) -> dict[str, Any]:
    """The pretraining mix's bytes and documents, real and synthetic."""
    synth_bytes = sum(utf8_bytes(docs) for docs in synthetic.values())
    return {
        "real_bytes": real_bytes,
        "synthetic_bytes": synth_bytes,
        "synthetic_share_bytes": synth_bytes / max(real_bytes + synth_bytes, 1),
        "synthetic_docs": {g: len(d) for g, d in synthetic.items()},
        "rejected_for_length": rejected,
    }


def synthesize_into(
    cfg: Config, out: Path, world, train: list[str], held_out: list[str]
) -> dict[str, Any]:
    """Do the stage's work into folder `out`; return the report. Raises GateFailed.

    `world` is the story world (`story_world`) or None, `train` the validated training
    texts and `held_out` the val + test texts no synthetic document may leak.
    """
    s = cfg.synthesize
    report: dict[str, Any] = {"generators": list(s.generators)}
    mimic, entries = write_exact_sources(cfg, out, world, train)
    report.update(entries)
    real_bytes = utf8_bytes(train)
    generated, rejected = generate_augmentation(cfg, world, mimic, real_bytes)
    index = NGramIndex(held_out, n=s.contamination_ngram)
    synthetic, checks, failures = check_augmentation(cfg, generated, index, train)
    examples, ft_leaks = drop_contaminated_examples(build_finetune(cfg, world, train), index)
    checks["finetune"] = {"contamination": ft_leaks}
    # Documents checked and dropped: each generator's, then the fine-tuning contexts.
    n_generated = sum(map(len, generated.values()))
    total = n_generated + ft_leaks["n_docs"]
    dropped = n_generated - sum(map(len, synthetic.values())) + ft_leaks["contaminated"]
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
    report["mix"] = mix_report(real_bytes, synthetic, rejected)
    report["finetune"] = {
        "kind": examples[0].kind if examples else "none",
        "train_examples": len(ft_train),
        "test_examples": len(ft_test),
    }
    return report
