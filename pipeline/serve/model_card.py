"""Model card: one markdown page that says what a registered model is and how good it is.

The `register` stage attaches it to the MLflow model version. Everything comes from files the
stages already wrote, so the card never re-measures anything:

- `reports/<stage>.json` of validate, synthesize, tokenizer, pretrain, finetune and evaluate
  (read by `load_reports`; a stage that did not run simply has no report);
- the model config (`models/finetune/model_config.json`), its parameter count, the tokenizer
  meta (`data/tokenizer/meta.json`) and the resolved `params.yaml`;
- decoding samples, the quality-gate verdict and lineage, from the register stage.

`render_model_card(CardInputs(...))` returns the markdown: a summary, then one `##` section each
for Data, Synthetic data, Tokenizer, Architecture, Training compute, Evaluation, Quality gate,
Decoding samples, Lineage and Limitations. A missing report turns its part of the card into
"not available (stage X not run)"; a missing key into "n/a". Free text placed in a table (sample
text, lineage values, expectation names) is escaped so that `|`, newlines and markdown or HTML
characters cannot break the table.

Standard library only (plus small stdlib-only pipeline modules): importable without torch or mlflow.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import LmforgeError
from pipeline.core.markdown import (
    Md,
    bullets,
    code,
    duration,
    escape_cell,
    fmt,
    number,
    pct,
    si,
    table,
    with_ci,
)
from pipeline.stages import STAGES as ALL_STAGES

# The stages whose reports the card reads: every stage before `register`, which writes it.
STAGES = tuple(s for s in ALL_STAGES if s != "register")
MAX_SAMPLE_CHARS = 600  # a sample longer than this is cut in the card (the card is a summary)
_WALL_KEYS = ("wall_time_s", "wall_seconds", "seconds", "elapsed_s", "time_s", "train_seconds")
_FLOPS_KEYS = ("flops", "train_flops", "total_flops")
_OPS = {"<=": "≤", ">=": "≥", "==": "=", "!=": "≠", "max": "≤", "min": "≥"}


@dataclass(frozen=True)
class CardInputs:
    """Everything the card shows; the register stage gathers it from the run's files."""

    model_name: str
    reports: dict[str, dict]  # stage name -> parsed reports/<stage>.json (some may be missing)
    model_config: dict  # models/finetune/model_config.json
    num_params: int  # parameter count (tied head once)
    tokenizer_meta: dict  # data/tokenizer/meta.json
    params: dict  # resolved params.yaml as a dict
    samples: list[tuple[str, str]]  # (prompt, generated text) decoding samples
    gate: dict  # {"passed": bool, "checks": [{"name","value","threshold","op","passed"}...]}
    lineage: dict[str, str]  # git commit, dvc experiment, data/tokenizer digests, run ids...


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def load_reports(reports_dir: Path, stages: Sequence[str] = STAGES) -> dict[str, dict]:
    """`reports/<stage>.json` for each stage that has one; a stage without a file is left out.

    Raises LmforgeError naming the file when it exists but is not a readable JSON object.
    """
    reports: dict[str, dict] = {}
    for stage in stages:
        path = Path(reports_dir) / f"{stage}.json"
        if not path.is_file():
            continue
        hint = f"re-run the stage (`dvc repro {stage}`) to rewrite it"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LmforgeError(f"{path}: not a readable JSON report ({e}); {hint}") from None
        if not isinstance(data, dict):
            raise LmforgeError(f"{path}: expected a JSON object, got {type(data).__name__}; {hint}")
        reports[stage] = data
    return reports


def dig(data: Any, *keys: str) -> Any:
    """`data[k1][k2]...`, or None as soon as a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _first(data: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((data[k] for k in keys if data.get(k) is not None), None)


# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------


def not_run(stage: str) -> str:
    """The card's words for a part whose stage report is missing."""
    return f"not available (stage {stage} not run)"


# --------------------------------------------------------------------------------------
# Shared facts
# --------------------------------------------------------------------------------------


def _sources(inp: CardInputs) -> list[Mapping[str, Any]]:
    sources = dig(inp.params, "validate", "sources")
    return [s for s in sources if isinstance(s, Mapping)] if isinstance(sources, list) else []


def _source_name(src: Mapping[str, Any]) -> str:
    """The label the validate stage gives a source (pipeline/data/ingest.py)."""
    kind = src.get("kind")
    return str(src.get("name") or (src.get("dataset") if kind == "hub" else kind))


def corpus_description(inp: CardInputs) -> str:
    """`a synthetic story world` or `the configured corpus (a, b)`."""
    sources = _sources(inp)
    if sources and all(s.get("kind") == "storyworld" for s in sources):
        return "a synthetic story world"
    if sources:
        return "the configured corpus (sources: " + ", ".join(map(_source_name, sources)) + ")"
    return "the configured corpus"


def _tokens_seen(inp: CardInputs) -> float | None:
    """Pretraining tokens from the report, else max_steps x tokens_per_step from the params."""
    seen = number(dig(inp.reports, "pretrain", "tokens_seen"))
    if seen is not None:
        return seen
    steps = number(dig(inp.params, "pretrain", "max_steps"))
    per_step = number(dig(inp.params, "pretrain", "tokens_per_step"))
    return None if steps is None or per_step is None else steps * per_step


def _bytes_per_token(inp: CardInputs) -> float | None:
    bpt = number(dig(inp.tokenizer_meta, "bytes_per_token", "val"))
    return bpt if bpt is not None else number(dig(inp.reports, "tokenizer", "bytes_per_token_val"))


def _finetune_method(inp: CardInputs) -> str | None:
    method = dig(inp.reports, "finetune", "method") or dig(inp.params, "finetune", "method")
    return None if method is None else str(method)


def _device(inp: CardInputs) -> str | None:
    device = dig(inp.reports, "pretrain", "device")
    return None if device is None else str(device)


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


def summary(inp: CardInputs) -> list[str]:
    """The paragraph under the title: what the model is and its headline numbers."""
    cfg = inp.model_config
    shape = ", ".join(
        f"{label} {fmt(cfg[key])}"
        for key, label in (("n_layer", "layers"), ("n_head", "heads"), ("n_embd", "width"))
        if key in cfg
    )
    text = f"A {fmt(inp.num_params)}-parameter decoder-only GPT" + (f" ({shape})" if shape else "")
    tokens = _tokens_seen(inp)
    if tokens is not None:
        text += f", pretrained on {fmt(int(tokens))} tokens of {corpus_description(inp)}"
    method = _finetune_method(inp)
    if method:
        text += f" and fine-tuned with {method}"
    text += "."
    bpb = number(dig(inp.reports, "evaluate", "test", "bits_per_byte"))
    if bpb is not None:
        text += f" Test bits/byte: {fmt(bpb)}."
    if "passed" in inp.gate:
        text += f" Quality gate: **{'passed' if inp.gate['passed'] else 'failed'}**."
    return [text, "", "_Generated by lmforge from the stage reports of one pipeline run._"]


def _source_origin(src: Mapping[str, Any]) -> str:
    kind = src.get("kind")
    if kind == "storyworld":
        origin = f"story-world grammar, {fmt(src.get('num_docs'))} docs generated"
    elif kind == "hub":
        origin = f"Hugging Face Hub dataset {src.get('dataset')}"
        if src.get("subset"):
            origin += f" ({src['subset']})"
        origin += f", split {src.get('split', 'train')}"
    else:
        origin = f"{kind} file(s) {src.get('path')}"
        if kind == "txt":
            origin += f", one doc per {src.get('txt_mode', 'paragraph')}"
    max_docs = number(src.get("max_docs"))
    if max_docs:
        origin += f", first {fmt(int(max_docs))} docs"
    return origin


def _failed_expectations(expectations: Any) -> list[str]:
    """`- expect_x on text: 3.2 % unexpected` for each unmet expectation."""
    lines = []
    for e in expectations if isinstance(expectations, list) else []:
        if isinstance(e, Mapping) and not e.get("success", True):
            if e.get("observed_value") is not None:
                seen = f"observed {fmt(e['observed_value'])}"
            else:
                seen = f"{fmt(e.get('unexpected_percent'))} % unexpected"
            lines.append(f"- {code(e.get('expectation'))} on {code(e.get('column'))}: {seen}")
    return lines


def _validation(report: Mapping[str, Any]) -> list[str]:
    expectations = dig(report, "gate", "expectations")
    expectations = expectations if isinstance(expectations, list) else []
    met = sum(1 for e in expectations if isinstance(e, Mapping) and e.get("success"))
    success = dig(report, "gate", "success")
    verdict = "n/a" if success is None else ("**passed**" if success else "**failed**")
    lines = [
        f"Validation (Great Expectations gate): {verdict}, "
        f"{met} of {len(expectations)} expectations met.",
    ]
    failed = _failed_expectations(expectations)
    if failed:
        lines += ["", "Failed expectations:", "", *failed]
    splits = _mapping(report.get("splits"))
    if splits:
        lines += ["", "Validated splits:", ""]
        lines += table(
            ["split", "docs", "bytes"],
            [(s, dig(v, "docs"), dig(v, "bytes")) for s, v in splits.items()],
        )
    aggregates = _mapping(report.get("aggregates"))
    if aggregates:
        lines += ["", "Corpus aggregates (exact, over all rows):", ""]
        lines += table(["aggregate", "value"], aggregates.items())
    dropped = _mapping(report.get("dropped"))
    drops = ", ".join(f"{k}: {fmt(v)}" for k, v in dropped.items()) if dropped else "none"
    return [*lines, "", f"Documents dropped while cleaning: {drops}."]


def data_section(inp: CardInputs) -> list[str]:
    """Sources from params, the validation verdict, docs per split and the aggregates."""
    report = inp.reports.get("validate")
    kept = _mapping(dig(report, "rows_per_source"))
    sources = _sources(inp)
    if sources:
        lines = ["Sources (`validate.sources`):", ""]
        lines += table(
            ["source", "kind", "origin", "docs kept"],
            [
                (_source_name(s), s.get("kind"), _source_origin(s), kept.get(_source_name(s)))
                for s in sources
            ],
        )
    else:
        lines = ["Sources: not recorded in the params."]
    lines.append("")
    if report is None:
        return [*lines, f"Validation: {not_run('validate')}."]
    return lines + _validation(report)


def _generator_rows(report: Mapping[str, Any], generators: list[str]) -> list[tuple]:
    rows = []
    for gen in generators:
        check = _mapping(dig(report, "checks", gen))
        gx = check.get("gx_success")
        rows.append(
            (
                gen,
                dig(report, "mix", "synthetic_docs", gen),
                dig(report, "mix", "rejected_for_length", gen),
                dig(check, "drift", "unigram_kl_bits"),
                dig(check, "drift", "length_distance"),
                dig(check, "contamination", "contaminated"),
                "n/a" if gx is None else ("passed" if gx else "failed"),
            )
        )
    return rows


def _entropy_lines(report: Mapping[str, Any]) -> list[str]:
    lines = []
    ent = _mapping(report.get("source_entropy"))
    if ent:
        lines.append(
            f"- **Story-world source entropy rate:** {fmt(ent.get('bits_per_byte'))} bits/byte "
            f"(± {fmt(ent.get('stderr'))} s.e., Monte Carlo over {fmt(ent.get('num_docs'))} "
            "docs): the floor no model of this source can beat."
        )
    mimic = _mapping(report.get("mimic"))
    if mimic:
        lines.append(
            f"- **n-gram mimic:** order {fmt(mimic.get('order'))}, "
            f"{fmt(mimic.get('bits_per_byte_own_samples'))} bits/byte on its own samples."
        )
    return lines


def synthetic_section(inp: CardInputs) -> list[str]:
    """Synthetic share, generators, their checks, the source entropy rate, the fine-tuning set."""
    report = inp.reports.get("synthesize")
    target = dig(inp.params, "synthesize", "synthetic_share")
    if report is None:
        return [f"Target synthetic share {pct(target)}; report {not_run('synthesize')}."]
    gens = report.get("generators") or dig(inp.params, "synthesize", "generators") or []
    gens = [str(g) for g in gens] if isinstance(gens, list) else []
    mix = _mapping(report.get("mix"))
    lines = bullets(
        [
            ("Generators", ", ".join(gens) or "none"),
            (
                "Synthetic share of pretraining bytes",
                f"{pct(mix.get('synthetic_share_bytes'))} (target {pct(target)}): "
                f"{fmt(mix.get('synthetic_bytes'))} synthetic + "
                f"{fmt(mix.get('real_bytes'))} real bytes",
            ),
            ("Contaminated share dropped", pct(report.get("contaminated_fraction"))),
        ]
    )
    lines += _entropy_lines(report)
    ft = _mapping(report.get("finetune"))
    if ft:
        lines.append(
            f"- **Fine-tuning set:** {ft.get('kind', 'n/a')} task, "
            f"{fmt(ft.get('train_examples'))} train / {fmt(ft.get('test_examples'))} test examples"
        )
    if gens:
        lines += ["", "Checks on each synthetic set (drift against the real corpus):", ""]
        lines += table(
            [
                "generator",
                "docs added",
                "rejected (length)",
                "unigram KL (bits)",
                "length distance",
                "contaminated",
                "GX suite",
            ],
            _generator_rows(report, gens),
        )
    return lines


def _either(first: Mapping[str, Any], second: Mapping[str, Any], key: str) -> Any:
    return first[key] if first.get(key) is not None else second.get(key)


def tokenizer_section(inp: CardInputs) -> list[str]:
    """Byte-level BPE: vocabulary, special tokens, compression, corpus digest."""
    meta, report = inp.tokenizer_meta or {}, inp.reports.get("tokenizer") or {}
    if not meta and not report:
        return [f"Tokenizer: {not_run('tokenizer')}."]
    specials = meta.get("special_tokens") or dig(inp.params, "tokenizer", "special_tokens") or []
    bpt = _mapping(meta.get("bytes_per_token"))
    if not bpt and report.get("bytes_per_token_val") is not None:
        bpt = {"val": report["bytes_per_token_val"]}
    splits = _mapping(meta.get("splits") or report.get("splits"))
    lines = bullets(
        [
            ("Type", "byte-level BPE (Hugging Face `tokenizers`): any UTF-8 text encodes"),
            ("Vocabulary size", fmt(_either(meta, report, "vocab_size"))),
            ("Special tokens", ", ".join(code(t) for t in specials) or "none"),
            ("Document separator id", fmt(_either(meta, report, "eot_id"))),
            ("Bytes per token", ", ".join(f"{s} {fmt(v)}" for s, v in bpt.items()) or "n/a"),
            (
                "Training corpus digest (md5)",
                code(_either(meta, report, "train_corpus_digest")),
            ),
        ]
    )
    if splits:
        lines += ["", "Token shards:", ""]
        lines += table(
            ["split", "docs", "bytes", "tokens"],
            [(s, dig(v, "docs"), dig(v, "bytes"), dig(v, "tokens")) for s, v in splits.items()],
        )
    return lines


def _count(n: Any) -> str:
    """`131,392 (131.4k)`; small counts without the SI form."""
    x = number(n)
    return fmt(n) if x is None or abs(x) < 1e4 else f"{fmt(n)} ({si(x)})"


def _position_encoding(cfg: Mapping[str, Any]) -> str:
    pos = cfg.get("pos_encoding")
    if pos == "rotary":
        return f"rotary (RoPE, base {fmt(cfg.get('rope_base'))})"
    return fmt(pos)


def architecture_section(inp: CardInputs) -> list[str]:
    """Layers, heads, width, context, positional encoding, activation, parameter count."""
    cfg = inp.model_config
    if not cfg:
        return ["Model config: not available (stage finetune not run)."]
    d, heads = number(cfg.get("n_embd")), number(cfg.get("n_head"))
    head = int(d // heads) if d and heads else None
    mlp = int(d * cfg["mlp_ratio"]) if d and number(cfg.get("mlp_ratio")) else None
    rows = [
        ("type", "decoder-only transformer, pre-LayerNorm, LM head tied to the token embedding"),
        ("layers", cfg.get("n_layer")),
        ("attention heads", cfg.get("n_head")),
        ("width (d_model)", cfg.get("n_embd")),
        ("head size", head),
        ("MLP hidden size", mlp),
        ("context (block_size, tokens)", cfg.get("block_size")),
        ("positional encoding", _position_encoding(cfg)),
        ("activation", cfg.get("activation")),
        ("biases", cfg.get("bias")),
        ("dropout", cfg.get("dropout")),
        ("vocabulary", cfg.get("vocab_size")),
        ("parameters", _count(inp.num_params)),
    ]
    return table(["property", "value"], rows)


def _flops(inp: CardInputs, report: Mapping[str, Any], tokens: float | None) -> str:
    reported = number(_first(report, _FLOPS_KEYS))
    if reported is not None:
        return si(reported, "FLOP")
    if tokens is None:
        return "n/a"
    return (
        f"{si(6 * inp.num_params * tokens, 'FLOP')}, estimated as 6·N·D "
        f"(N = {fmt(inp.num_params)} parameters, D = {fmt(int(tokens))} tokens; "
        "the pretrain report records no FLOPs, and attention FLOPs are not included)"
    )


def _throughput(report: Mapping[str, Any], tokens: float | None) -> tuple[str, str, str]:
    wall = number(_first(report, _WALL_KEYS))
    tok_s = number(report.get("tokens_per_s"))
    if tok_s is None and wall and tokens is not None:
        tok_s = tokens / wall
    missing = "not recorded in reports/pretrain.json"
    mfu = number(report.get("mfu"))
    return (
        duration(wall) if wall is not None else missing,
        fmt(tok_s) if tok_s is not None else missing,
        pct(mfu) if mfu else "n/a",
    )


def _finetune_lines(inp: CardInputs) -> list[str]:
    ft = _mapping(dig(inp.params, "finetune"))
    report = inp.reports.get("finetune")
    method = _finetune_method(inp)
    if report is None:
        return [f"- **Fine-tuning:** {not_run('finetune')} (configured method: {fmt(method)})"]
    compared = report.get("compare")
    others = f"; all of {', '.join(_mapping(report.get('methods')))} compared" if compared else ""
    return [
        f"- **Fine-tuning:** {method}, {fmt(ft.get('max_steps'))} steps at lr "
        f"{fmt(ft.get('lr'))} on the {ft.get('data', 'n/a')} data{others}"
    ]


def compute_section(inp: CardInputs) -> list[str]:
    """Pretraining tokens, FLOPs, wall time, tokens/s, device; the fine-tuning method."""
    report = inp.reports.get("pretrain")
    if report is None:
        return [f"- **Pretraining:** {not_run('pretrain')}", *_finetune_lines(inp)]
    tokens = _tokens_seen(inp)
    wall, tok_s, mfu = _throughput(report, tokens)
    device = _device(inp)
    if device is None:
        configured = dig(inp.params, "pretrain", "device")
        device = (
            f"{configured} (pretrain.device)"
            if configured in ("cpu", "cuda")
            else f"not recorded in reports/pretrain.json (pretrain.device: {fmt(configured)})"
        )
    lines = bullets(
        [
            ("Pretraining steps", fmt(report.get("steps"))),
            ("Pretraining tokens", fmt(None if tokens is None else int(tokens))),
            ("Training compute", _flops(inp, report, tokens)),
            ("Wall time", wall),
            ("Throughput (tokens/s)", tok_s),
            ("MFU", mfu),
            ("Device", device),
            (
                "Final losses",
                f"train {fmt(report.get('train_loss'))}, val {fmt(report.get('val_loss'))} "
                f"nats/token; val {fmt(report.get('val_bpb'))} bits/byte",
            ),
        ]
    )
    return lines + _finetune_lines(inp)


def _test_rows(ev: Mapping[str, Any]) -> list[tuple[str, Any]]:
    test, cal = _mapping(ev.get("test")), _mapping(dig(ev, "test", "calibration"))
    rows: list[tuple[str, Any]] = [
        ("test bits/byte", test.get("bits_per_byte")),
        ("test cross-entropy (nats/token)", test.get("cross_entropy")),
        ("test perplexity", test.get("perplexity")),
        ("test bits/token", test.get("bits_per_token")),
        ("ECE (expected calibration error)", cal.get("ece")),
        ("Brier score", cal.get("brier")),
        ("mean predictive entropy (nats)", cal.get("entropy")),
        (
            "top-1 accuracy / mean confidence",
            f"{fmt(cal.get('accuracy'))} / {fmt(cal.get('confidence'))}",
        ),
    ]
    for source, kl in _mapping(ev.get("source_kl")).items():
        kl = _mapping(kl)
        rows.append(
            (
                f"KL rate to the {source} source (bits/byte)",
                with_ci(kl.get("kl_bits_per_byte"), kl.get("ci_low"), kl.get("ci_high")),
            )
        )
    rows.append(("task accuracy (exact match, fine-tuning test split)", ev.get("task_accuracy")))
    rows.append(("test tokens scored", test.get("tokens_scored") or test.get("num_tokens")))
    return rows


def _finetune_table(inp: CardInputs) -> list[str]:
    report = inp.reports.get("finetune")
    if report is None:
        return [f"Fine-tuning methods: {not_run('finetune')}."]
    chosen = report.get("method")
    rows = [
        (
            f"{m} (chosen)" if m == chosen else m,
            dig(r, "answer_loss"),
            dig(r, "task_accuracy"),
            dig(r, "sharpness"),
            dig(r, "hessian_max_eig"),
            dig(r, "hessian_min_eig"),
            dig(r, "hessian_converged"),
        )
        for m, r in _mapping(report.get("methods")).items()
    ]
    header = [
        "method",
        "held-out answer loss",
        "task accuracy",
        "ε-sharpness",
        "largest Hessian eig.",
        "smallest Hessian eig.",
        "Lanczos converged",
    ]
    return [
        "Fine-tuning methods compared (same checkpoint and data order):",
        "",
        *table(header, rows),
        *_flatness_lines(report),
    ]


def _flatness_lines(report: Mapping[str, Any]) -> list[str]:
    """The sentences finetune generated from its measurements (`flatness` in finetune.json).

    The card repeats them rather than re-deriving them: finetune is where the numbers were
    measured, and its report says what they show, "NOT flatter" and negative curvature included.
    """
    sentences = report.get("flatness")
    if not isinstance(sentences, list) or not sentences:
        return ["", "What the flatness numbers show: not stated (finetune.json has no `flatness`)."]
    return [
        "",
        "What the flatness numbers show (lower is flatter; finetune, one held-out batch):",
        "",
        *(f"- {escape_cell(str(s))}" for s in sentences),
    ]


def _sharpness_table(ev: Mapping[str, Any], chosen: str | None) -> list[str]:
    sharp = _mapping(ev.get("sharpness"))
    if not sharp:
        return ["Sharpness: not measured."]
    rows = [
        (
            f"{m} (chosen)" if m == chosen else m,
            dig(r, "test_loss"),
            dig(r, "sharpness"),
            dig(r, "hessian_max_eig"),
            dig(r, "hessian_min_eig"),
            dig(r, "hessian_converged"),
        )
        for m, r in sharp.items()
    ]
    header = [
        "method",
        "test loss",
        "ε-sharpness",
        "largest Hessian eigenvalue",
        "smallest Hessian eigenvalue",
        "Lanczos converged",
    ]
    verdict = [f"- {escape_cell(str(s))}" for s in ev.get("flatness") or []]
    lines = ["Sharpness of the fine-tuned weights on the test split:", "", *table(header, rows)]
    return lines + (["", "What these show:", "", *verdict] if verdict else [])


def _decoding_table(ev: Mapping[str, Any]) -> list[str]:
    gen = {k: _mapping(v) for k, v in _mapping(ev.get("generation")).items()}
    if not gen:
        return []
    cols = list(dict.fromkeys(c for r in gen.values() for c in r))
    validity = any(number(r.get("validity_rate")) is not None for r in gen.values())
    rows = []
    for strategy, r in gen.items():
        row = [strategy, *(r.get(c) for c in cols)]
        if validity:
            v = number(r.get("validity_rate"))
            row.append(None if v is None else 1 - v)
        rows.append(row)
    header = [
        "strategy",
        *(c.replace("_", " ") for c in cols),
        *(["hallucination (1 − validity)"] if validity else []),
    ]
    return ["Decoding quality per strategy:", "", *table(header, rows)]


def evaluation_section(inp: CardInputs) -> list[str]:
    """Headline metrics table, fine-tuning comparison, sharpness and decoding tables."""
    ev = inp.reports.get("evaluate")
    if ev is None:
        lines = [f"Test metrics: {not_run('evaluate')}."]
    else:
        lines = table(["metric", "value"], _test_rows(ev))
    lines += ["", *_finetune_table(inp)]
    if ev is not None:
        lines += ["", *_sharpness_table(ev, _finetune_method(inp))]
        decoding = _decoding_table(ev)
        lines += ["", *decoding] if decoding else []
    return lines


def gate_section(inp: CardInputs) -> list[str]:
    """Each quality-gate check with its value, threshold and verdict."""
    checks = inp.gate.get("checks") if isinstance(inp.gate, Mapping) else None
    if not inp.gate or not isinstance(checks, list):
        return ["Quality gate: not available (the gate was not evaluated)."]
    rows = [
        (
            c.get("name"),
            c.get("value"),
            f"{_OPS.get(str(c.get('op')), c.get('op') or '')} {fmt(c.get('threshold'))}".strip(),
            Md("pass") if c.get("passed") else Md("**FAIL**"),
        )
        for c in checks
        if isinstance(c, Mapping)
    ]
    failed = sum(1 for c in checks if isinstance(c, Mapping) and not c.get("passed"))
    verdict = (
        f"**passed**: all {len(rows)} checks met."
        if inp.gate.get("passed")
        else f"**failed**: {failed} of {len(rows)} checks not met; the model must not be promoted."
    )
    return [f"Quality gate {verdict}", "", *table(["check", "value", "threshold", "result"], rows)]


def _clip(text: str, limit: int = MAX_SAMPLE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def samples_section(inp: CardInputs) -> list[str]:
    """The (prompt, generated text) pairs, escaped for the table."""
    if not inp.samples:
        return ["No decoding samples (`register.card_samples` is 0 or generation was skipped)."]
    strategy = dig(inp.params, "register", "decoding", "strategy")
    intro = "Generated with the served model's default decoding"
    intro += f" ({strategy})." if strategy else "."
    rows = [(i, _clip(str(p)), _clip(str(g))) for i, (p, g) in enumerate(inp.samples, 1)]
    return [intro, "", *table(["#", "prompt", "generated text"], rows)]


def lineage_section(inp: CardInputs) -> list[str]:
    """The lineage tags (commit, DVC experiment, digests, run ids) as a table."""
    if not inp.lineage:
        return ["Lineage: not recorded."]
    rows = [(k, "n/a" if v in (None, "") else str(v)) for k, v in inp.lineage.items()]
    return table(["key", "value"], rows)


def _hallucination(ev: Mapping[str, Any]) -> str | None:
    rates = {
        s: 1 - v
        for s, r in _mapping(ev.get("generation")).items()
        if (v := number(dig(r, "validity_rate"))) is not None
    }
    if not rates:
        return None
    shown = ", ".join(f"{s} {pct(r)}" for s, r in rates.items())
    return (
        f"- **Hallucination.** Measured as 1 − validity rate (the share of generations the "
        f"story-world grammar cannot produce): {shown}."
    )


def _calibration(ev: Mapping[str, Any]) -> str | None:
    cal = _mapping(dig(ev, "test", "calibration"))
    ece = number(cal.get("ece"))
    if ece is None:
        return None
    text = f"- **Calibration.** ECE {fmt(ece)} on the test split"
    acc, conf = number(cal.get("accuracy")), number(cal.get("confidence"))
    if acc is not None and conf is not None:
        side = "overconfident" if conf > acc else "underconfident"
        text += (
            f": mean confidence {fmt(conf)} against top-1 accuracy {fmt(acc)} ({side}); "
            "do not read its probabilities as exact"
        )
    return text + "."


def _scale_limit(inp: CardInputs) -> str:
    tokens = _tokens_seen(inp)
    text = f"- **Tiny model.** {fmt(inp.num_params)} parameters"
    if tokens is not None and inp.num_params:
        text += (
            f", pretrained on {fmt(int(tokens))} tokens "
            f"({fmt(tokens / inp.num_params)} tokens per parameter; compute-optimal training "
            "uses about 20)"
        )
    device = _device(inp) or dig(inp.params, "pretrain", "device")
    if device and device != "auto":
        text += f", trained on {str(device).upper() if device == 'cpu' else device}"
    else:
        text += "; the training device is not recorded"
    return text + ". It is a research and pipeline artefact, not a general-purpose model."


def _data_limit(inp: CardInputs) -> str:
    corpus = corpus_description(inp)
    if corpus == "a synthetic story world":
        text = (
            f"- **Narrow data.** Trained only on {corpus}: short template stories with a small "
            "cast, objects and places. It knows nothing outside that world."
        )
    else:
        text = (
            f"- **Narrow data.** Trained only on {corpus}; it reflects that corpus's domain, "
            "language and biases and knows nothing else."
        )
    share = number(dig(inp.reports, "synthesize", "mix", "synthetic_share_bytes"))
    return text + (f" {pct(share)} of the pretraining bytes are synthetic." if share else "")


def _context_limit(inp: CardInputs) -> str | None:
    block = number(inp.model_config.get("block_size"))
    if block is None:
        return None
    bpt = _bytes_per_token(inp)
    approx = f" (about {fmt(int(block * bpt))} bytes of text)" if bpt else ""
    return (
        f"- **Context.** At most block_size = {fmt(int(block))} tokens{approx}; a longer "
        "prompt is cropped from the left and everything before it is invisible to the model."
    )


def _safety_limit(inp: CardInputs) -> str:
    if dig(inp.params, "finetune", "data") == "corpus":
        tuned = "fine-tuned only on the pretraining corpus"
    else:
        kind = dig(inp.reports, "synthesize", "finetune", "kind")
        tuned = f"fine-tuned only on a small synthetic {kind + ' ' if kind else ''}task"
    return (
        "- **No safety tuning.** No RLHF, instruction tuning, content filtering or red-teaming; "
        f"{tuned}. Not for use with people or for decisions."
    )


def limitations_section(inp: CardInputs) -> list[str]:
    """Honest, specific limits: scale, data, context, safety, hallucination, calibration."""
    ev = _mapping(inp.reports.get("evaluate"))
    lines = [_scale_limit(inp), _data_limit(inp), _context_limit(inp)]
    lines.append(_safety_limit(inp))
    if ev:
        lines.append(
            _hallucination(ev)
            or "- **Hallucination.** Not measured (no validity checker for this corpus)."
        )
        lines.append(_calibration(ev))
        acc = number(ev.get("task_accuracy"))
        if acc is not None:
            lines.append(
                f"- **Task skill.** Exact-match accuracy {pct(acc)} on the fine-tuning test split."
            )
    else:
        lines.append(f"- **Hallucination and calibration:** {not_run('evaluate')}.")
    if inp.gate and not inp.gate.get("passed", True):
        lines.append("- **Quality gate failed.** See the Quality gate section.")
    return [line for line in lines if line]


SECTIONS: tuple[tuple[str, Callable[[CardInputs], list[str]]], ...] = (
    ("Data", data_section),
    ("Synthetic data", synthetic_section),
    ("Tokenizer", tokenizer_section),
    ("Architecture", architecture_section),
    ("Training compute", compute_section),
    ("Evaluation", evaluation_section),
    ("Quality gate", gate_section),
    ("Decoding samples", samples_section),
    ("Lineage", lineage_section),
    ("Limitations", limitations_section),
)


def render_model_card(inp: CardInputs) -> str:
    """The model card as markdown: title, summary, then one `##` section per topic."""
    title = " ".join(str(inp.model_name).split()) or "model"
    lines = [f"# {title}", "", *summary(inp)]
    for heading, render in SECTIONS:
        lines += ["", f"## {heading}", "", *render(inp)]
    return "\n".join(lines) + "\n"
