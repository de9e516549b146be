"""Model card: one markdown page that says what a registered model is and how good it is.

The `register` stage attaches it to the MLflow model version. It assembles what the stages
already wrote and never re-measures anything:

- the typed config (sources, synthetic share, fine-tuning method, decoding defaults);
- `reports/validate.json` (the Great Expectations gate), `reports/synthesize.json`,
  `reports/pretrain.json`, `reports/evaluate.json` and the tokenizer's `meta.json`, read by
  the keys those stages write (a missing key is an error naming the file and the key);
- `reports/evaluate.md` and `reports/finetune.md`, embedded as the stages rendered them;
- the model config, decoding samples, gate verdict and lineage, from the register stage.

A stage that did not run (its file is absent) turns its part into "not available (stage X
not run)". Tables go through `pipeline.core.markdown.table`, which escapes free text.
Standard library only (plus stdlib-only pipeline modules): importable without torch or mlflow.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.core.errors import LmforgeError
from pipeline.core.markdown import Md, bullets, code, duration, fmt, pct, si, table
from pipeline.core.names import MODEL_CONFIG_FILE, report_json, report_md
from pipeline.text.shards import META_FILE

MAX_SAMPLE_CHARS = 600  # a sample longer than this is cut in the card (the card is a summary)
_OPS = {"<=": "≤", ">=": "≥"}  # the comparisons of register's check_gate


class Report(Mapping[str, Any]):
    """A stage's JSON (or a part of it): a missing key is an error naming the file and key."""

    def __init__(self, data: Mapping[str, Any], where: Path, keys: tuple[str, ...] = ()):
        self._data, self._where, self._keys = data, where, keys

    def __getitem__(self, key: str) -> Any:
        if key not in self._data:
            name = ".".join((*self._keys, key))
            raise LmforgeError(f"{self._where}: no key {name!r}; re-run the stage that writes it")
        return self._wrap(self._data[key], (*self._keys, key))

    def _wrap(self, value: Any, keys: tuple[str, ...]) -> Any:
        """Dicts (also inside lists) as Reports, so their missing keys are named too."""
        if isinstance(value, list):
            return [self._wrap(v, (*keys[:-1], f"{keys[-1]}[{i}]")) for i, v in enumerate(value)]
        return Report(value, self._where, keys) if isinstance(value, dict) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def read_report(path: Path) -> Report | None:
    """The JSON object at `path`, or None when the file does not exist (the stage did not run)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{path}: not a readable JSON report ({e}); re-run its stage") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return Report(data, path)


def not_run(stage: str) -> str:
    """The card's words for a part whose stage output is missing."""
    return f"not available (stage {stage} not run)"


@dataclass(frozen=True)
class CardInputs:
    """What the register stage hands over; the stage files are read from `cfg`'s paths."""

    cfg: Config
    model_config: dict[str, Any]  # model_config.json of the registered weights (GPTConfig)
    num_params: int  # parameter count (tied head once)
    samples: list[tuple[str, str]]  # (prompt, generated text) with the served defaults
    gate: dict[str, Any]  # register's check_gate result: {"passed", "checks": [...]}
    lineage: dict[str, str]  # git commit, DVC experiment, digests, run ids
    timing: dict[str, float] = field(default_factory=dict)  # pretrain MLflow: wall_seconds,
    # tokens_per_s (pretrain's DVC metrics hold no timings: they would differ on every run)

    def report(self, stage: str) -> Report | None:
        return read_report(self.cfg.path("reports") / report_json(stage))

    def markdown(self, stage: str) -> str | None:
        path = self.cfg.path("reports") / report_md(stage)
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def tokenizer_meta(self) -> Report | None:
        return read_report(self.cfg.path("tokenizer") / META_FILE)


def _tokens_seen(inp: CardInputs) -> int | None:
    pretrain = inp.report("pretrain")
    return None if pretrain is None else int(pretrain["tokens_seen"])


def _corpus(cfg: Config) -> str:
    if all(s.kind == "storyworld" for s in cfg.validate.sources):
        return "a synthetic story world"
    return "the configured corpus (" + ", ".join(s.kind for s in cfg.validate.sources) + ")"


def summary(inp: CardInputs) -> list[str]:
    """The paragraph under the title: what the model is and its headline numbers."""
    m = inp.model_config
    text = f"A {fmt(inp.num_params)}-parameter decoder-only GPT"
    if m:
        text += f" ({m['n_layer']} layers, {m['n_head']} heads, width {m['n_embd']})"
    tokens = _tokens_seen(inp)
    if tokens is not None:
        text += f", pretrained on {fmt(tokens)} tokens of {_corpus(inp.cfg)}"
    text += f" and fine-tuned with {inp.cfg.finetune.method}."
    evaluation = inp.report("evaluate")
    if evaluation is not None:
        text += f" Test bits/byte: {fmt(evaluation['test']['bits_per_byte'])}."
    if inp.gate:
        text += f" Quality gate: **{'passed' if inp.gate['passed'] else 'failed'}**."
    return [text, "", "_Generated by lmforge from the stage reports of one pipeline run._"]


def _origin(src: Any) -> str:
    """Where a `validate.sources` entry reads its documents."""
    if src.kind == "storyworld":
        return f"story-world grammar, {fmt(src.num_docs)} docs generated"
    if src.kind == "hub":
        subset = f" ({src.subset})" if src.subset else ""
        return f"Hugging Face Hub dataset {src.dataset}{subset}, split {src.split}"
    return f"{src.kind} {src.path}"


def data_section(inp: CardInputs) -> list[str]:
    """Sources from the config, the Great Expectations verdict, docs per split."""
    lines = ["Sources (`validate.sources`):", ""]
    lines += table(
        ["kind", "name", "origin"], [(s.kind, s.name, _origin(s)) for s in inp.cfg.validate.sources]
    )
    report = inp.report("validate")
    if report is None:
        return [*lines, "", f"Validation: {not_run('validate')}."]
    gate = report["gate"]
    met = sum(1 for e in gate["expectations"] if e["success"])
    verdict = "**passed**" if gate["success"] else "**failed**"
    n = len(gate["expectations"])
    lines += ["", f"Great Expectations gate: {verdict}, {met} of {n} expectations met."]
    failed = [e for e in gate["expectations"] if not e["success"]]
    if failed:
        rows = [
            (e["expectation"], e["column"], e["observed_value"], e["unexpected_percent"])
            for e in failed
        ]
        lines += ["", *table(["failed expectation", "column", "observed", "% unexpected"], rows)]
    lines += ["", "Documents kept per source and split:", ""]
    lines += table(["source", "docs"], report["rows_per_source"].items())
    splits = [(s, v["docs"], v["bytes"]) for s, v in report["splits"].items()]
    lines += ["", *table(["split", "docs", "bytes"], splits)]
    dropped = ", ".join(f"{k}: {fmt(v)}" for k, v in report["dropped"].items()) or "none"
    return [*lines, "", f"Documents dropped while cleaning: {dropped}."]


def synthetic_section(inp: CardInputs) -> list[str]:
    """Synthetic share against its target, each generator's drift and checks, the task set."""
    target, gens = inp.cfg.synthesize.synthetic_share, inp.cfg.synthesize.generators
    report = inp.report("synthesize")
    if report is None:
        return [f"Target synthetic share {pct(target)}; report {not_run('synthesize')}."]
    mix, ft = report["mix"], report["finetune"]
    items = [
        ("Generators", ", ".join(gens) or "none"),
        (
            "Synthetic share of pretraining bytes",
            f"{pct(mix['synthetic_share_bytes'])} (target {pct(target)}): "
            f"{fmt(mix['synthetic_bytes'])} synthetic + {fmt(mix['real_bytes'])} real bytes",
        ),
        (
            "Fine-tuning set",
            f"{ft['kind']} task, {fmt(ft['train_examples'])} train / "
            f"{fmt(ft['test_examples'])} test examples",
        ),
    ]
    if "source_entropy" in report:  # only a story-world corpus has a true source to measure
        ent = report["source_entropy"]
        items.append(
            (
                "Story-world source entropy rate",
                f"{fmt(ent['bits_per_byte'])} bits/byte (± {fmt(ent['stderr'])} "
                f"s.e., {fmt(ent['num_docs'])} docs): the floor no model of this source can beat",
            )
        )
    rows = []
    for gen in gens:
        drift, check = report["checks"][gen]["drift"], report["checks"][gen]
        gx = Md("passed") if check["gx_success"] else Md("**failed**")
        counts = (mix["synthetic_docs"][gen], mix["rejected_for_length"][gen])
        kl, dist = drift["unigram_kl_bits"], drift["length_distance"]
        rows.append((gen, *counts, kl, dist, check["contamination"]["contaminated"], gx))
    header = ["generator", "docs added", "rejected (length)", "unigram KL (bits)"]
    header += ["length distance", "contaminated", "GX suite"]
    return [*bullets(items), "", "Drift against the real corpus:", "", *table(header, rows)]


def tokenizer_section(inp: CardInputs) -> list[str]:
    """Byte-level BPE from meta.json: vocabulary, special tokens, compression, shards."""
    meta = inp.tokenizer_meta()
    if meta is None:
        return [f"Tokenizer: {not_run('tokenizer')}."]
    items = [
        ("Type", "byte-level BPE (Hugging Face `tokenizers`): any UTF-8 text encodes"),
        ("Vocabulary size", fmt(meta["vocab_size"])),
        ("Special tokens", ", ".join(code(t) for t in meta["special_tokens"])),
        ("End-of-text token", f"{code(meta['special_tokens'][0])} (id {meta['eot_id']})"),
        ("Training corpus digest (md5)", code(meta["train_corpus_digest"])),
    ]
    rows = [
        (s, v["docs"], v["bytes"], v["tokens"], meta["bytes_per_token"][s])
        for s, v in meta["splits"].items()
    ]
    header = ["split", "docs", "bytes", "tokens", "bytes/token"]
    return [*bullets(items), "", "Token shards:", "", *table(header, rows)]


def architecture_section(inp: CardInputs) -> list[str]:
    """model_config.json (the GPTConfig fields), the head size and the parameter count."""
    m = inp.model_config
    if not m:
        return [f"Model config: {not_run('finetune')}."]
    n = inp.num_params
    rows = [
        *m.items(),
        ("head size", m["n_embd"] // m["n_head"]),
        ("parameters", f"{fmt(n)} ({si(n)})"),
    ]
    intro = "Decoder-only transformer, pre-LayerNorm, LM head tied to the token embedding."
    return [intro, "", *table([MODEL_CONFIG_FILE, "value"], rows)]


def compute_section(inp: CardInputs) -> list[str]:
    """Pretraining steps, tokens, FLOPs, wall time, throughput, device; the fine-tuning run."""
    ft = inp.cfg.finetune
    tuned = f"- **Fine-tuning:** {ft.method}, {fmt(ft.max_steps)} steps at lr {fmt(ft.lr)} on "
    tuned += f"the {ft.data} data" + ("; every method compared" if ft.compare else "")
    report = inp.report("pretrain")
    if report is None:
        return [f"- **Pretraining:** {not_run('pretrain')}", tuned]
    wall, tok_s = inp.timing.get("wall_seconds"), inp.timing.get("tokens_per_s")
    unlogged = "not available (no pretrain run in MLflow)"
    items = [
        ("Pretraining steps", fmt(report["steps"])),
        ("Pretraining tokens", fmt(report["tokens_seen"])),
        ("Training compute", si(report["flops"], "FLOP")),
        ("Wall time", duration(wall) if wall is not None else unlogged),
        ("Throughput (tokens/s)", fmt(tok_s) if tok_s is not None else unlogged),
        ("Device", f"{report['device']} x {report['world_size']}"),
        (
            "Final losses",
            f"train {fmt(report['train_loss'])}, val {fmt(report['val_loss'])} nats/token; "
            f"val {fmt(report['val_bpb'])} bits/byte",
        ),
    ]
    return [*bullets(items), tuned]


def _embedded(md: str, drop: tuple[str, ...] = ()) -> list[str]:
    """A stage's markdown inside a card section: no title, `##` as `###`, `drop` sections out."""
    lines, skipping = [], False
    for line in md.rstrip("\n").splitlines():
        level = len(line) - len(line.lstrip("#"))
        if level == 1:
            continue
        if level == 2:
            skipping = line[3:].strip() in drop
        if level:
            line = "#" + line
        if not skipping:
            lines.append(line)
    return "\n".join(lines).strip("\n").splitlines()


def evaluation_section(inp: CardInputs) -> list[str]:
    """evaluate.md's tables (test metrics, KL to the source, sharpness, decoding)."""
    md = inp.markdown("evaluate")
    if md is None:
        return [f"Test metrics: {not_run('evaluate')}."]
    return _embedded(md, drop=("Samples",))  # the card has its own samples, served defaults


def finetune_section(inp: CardInputs) -> list[str]:
    """finetune.md: the methods compared on held-out data, and what its numbers show."""
    md = inp.markdown("finetune")
    if md is None:
        return [f"Fine-tuning methods: {not_run('finetune')}."]
    return _embedded(md)


def gate_section(inp: CardInputs) -> list[str]:
    """Each quality-gate check with its value, threshold and verdict."""
    if not inp.gate:
        return ["Quality gate: not available (the gate was not evaluated)."]
    checks = inp.gate["checks"]
    rows = [
        (
            c["name"],
            c["value"],
            f"{_OPS[c['op']]} {fmt(c['threshold'])}",
            Md("pass") if c["passed"] else Md("**FAIL**"),
        )
        for c in checks
    ]
    failed = sum(1 for c in checks if not c["passed"])
    verdict = (
        f"**passed**: all {len(rows)} checks met."
        if inp.gate["passed"]
        else f"**failed**: {failed} of {len(rows)} checks not met; the model must not be promoted."
    )
    return [f"Quality gate {verdict}", "", *table(["check", "value", "threshold", "result"], rows)]


def _clip(text: str) -> str:
    return text if len(text) <= MAX_SAMPLE_CHARS else text[:MAX_SAMPLE_CHARS].rstrip() + " …"


def samples_section(inp: CardInputs) -> list[str]:
    """The (prompt, generated text) pairs, with the served model's default decoding."""
    if not inp.samples:
        return ["No decoding samples (`register.card_samples` is 0)."]
    strategy = inp.cfg.register.decoding.strategy
    intro = f"Generated with the served defaults (`register.decoding`: {strategy})."
    rows = [(i, _clip(p), _clip(g)) for i, (p, g) in enumerate(inp.samples, 1)]
    return [intro, "", *table(["#", "prompt", "generated text"], rows)]


def lineage_section(inp: CardInputs) -> list[str]:
    """The lineage tags (commit, DVC experiment, digests, run ids)."""
    if not inp.lineage:
        return ["Lineage: not recorded."]
    return table(["key", "value"], [(k, v or "n/a") for k, v in inp.lineage.items()])


def _evaluation_limits(ev: Report) -> list[str]:
    """Hallucination, calibration and task skill, from evaluate.json."""
    rates = {s: 1 - r["validity_rate"] for s, r in ev["generation"].items() if "validity_rate" in r}
    shown = ", ".join(f"{s} {pct(r)}" for s, r in rates.items())
    lines = [
        f"- **Hallucination.** Share of generations the story-world grammar cannot produce "
        f"(1 − validity): {shown}."
        if rates
        else "- **Hallucination.** Not measured (no validity checker for this corpus)."
    ]
    cal = ev["test"]["calibration"]
    side = "overconfident" if cal["confidence"] > cal["accuracy"] else "underconfident"
    lines.append(
        f"- **Calibration.** ECE {fmt(cal['ece'])} on the test split: mean confidence "
        f"{fmt(cal['confidence'])} against top-1 accuracy {fmt(cal['accuracy'])} ({side})."
    )
    if ev["task_accuracy"] is not None:
        lines.append(
            f"- **Task skill.** Exact-match accuracy {pct(ev['task_accuracy'])} on the "
            "fine-tuning test split."
        )
    return lines


def limitations_section(inp: CardInputs) -> list[str]:
    """Specific limits: scale, data, context, safety, hallucination, calibration, gate."""
    cfg, tokens = inp.cfg, _tokens_seen(inp)
    scale = f"- **Tiny model.** {fmt(inp.num_params)} parameters"
    if tokens is not None and inp.num_params:
        per = fmt(tokens / inp.num_params)
        scale += f", pretrained on {fmt(tokens)} tokens ({per} per parameter; compute-optimal "
        scale += "training uses about 20)"
    synth = inp.report("synthesize")
    share = (
        f" {pct(synth['mix']['synthetic_share_bytes'])} of its pretraining bytes are synthetic."
        if synth
        else ""
    )
    lines = [
        scale + ". A research and pipeline artefact, not a general-purpose model.",
        f"- **Narrow data.** Trained only on {_corpus(cfg)}; it knows nothing outside it.{share}",
    ]
    if inp.model_config:
        lines.append(
            f"- **Context.** At most block_size = {fmt(inp.model_config['block_size'])} tokens; "
            "a longer prompt is cropped from the left; what came before is invisible to the model."
        )
    tuned = "the pretraining corpus" if cfg.finetune.data == "corpus" else "a small synthetic task"
    lines.append(
        f"- **No safety tuning.** No RLHF, instruction tuning, content filtering or red-teaming; "
        f"fine-tuned only on {tuned}. Not for use with people or for decisions."
    )
    ev = inp.report("evaluate")
    lines += (
        _evaluation_limits(ev)
        if ev is not None
        else [f"- **Hallucination and calibration:** {not_run('evaluate')}."]
    )
    if inp.gate and not inp.gate["passed"]:
        lines.append("- **Quality gate failed.** See the Quality gate section.")
    return lines


SECTIONS: tuple[tuple[str, Callable[[CardInputs], list[str]]], ...] = (
    ("Data", data_section),
    ("Synthetic data", synthetic_section),
    ("Tokenizer", tokenizer_section),
    ("Architecture", architecture_section),
    ("Training compute", compute_section),
    ("Evaluation", evaluation_section),
    ("Fine-tuning", finetune_section),
    ("Quality gate", gate_section),
    ("Decoding samples", samples_section),
    ("Lineage", lineage_section),
    ("Limitations", limitations_section),
)


def render_model_card(inp: CardInputs) -> str:
    """The model card as markdown: title, summary, then one `##` section per topic."""
    title = " ".join(inp.cfg.register.model_name.split()) or "model"
    lines = [f"# {title}", "", *summary(inp)]
    for heading, render in SECTIONS:
        lines += ["", f"## {heading}", "", *render(inp)]
    return "\n".join(lines) + "\n"
