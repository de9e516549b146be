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
- exact-match accuracy on the fine-tuning test split.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.config import Config
from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_write_json, atomic_write_text
from pipeline.core.seeding import derive_seed
from pipeline.data.ingest import storyworld_spec
from pipeline.eval import lm as M
from pipeline.eval.sharpness import flatness_verdict
from pipeline.model.generate import DecodeConfig, generate
from pipeline.model.gpt import GPT
from pipeline.ops.stage_runner import stage_main
from pipeline.text.shards import check_text_bytes, read_meta, read_shard
from pipeline.text.task_data import evaluate_task, read_examples, tokenize
from pipeline.text.tokenizer import decode, encode_docs, load_tokenizer, token_byte_lengths
from pipeline.train import checkpoint as ckpt
from pipeline.train.batches import eval_batches

log = logging.getLogger(__name__)
STAGE = "evaluate"
LN2 = math.log(2)


def load_model(folder: Path, weights: Path | None = None) -> GPT:
    """A GPT from `folder/model_config.json` and its safetensors weights, in eval mode."""
    gcfg, state = ckpt.read_model_files(folder, weights, hint="run `dvc repro finetune`")
    model = GPT(gcfg)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def test_scores(model: GPT, tokens: np.ndarray, cfg: Config, token_bytes: torch.Tensor) -> dict:
    """Cross-entropy, perplexity, bits/byte, loss by position and calibration on the test shard.

    The shard is cut into consecutive windows of T+1 tokens that overlap by one token; every
    token but the first of a window is predicted from the window's earlier tokens, so each
    token after the shard's first is scored exactly once. Bits per byte divides by the exact
    bytes of the scored target tokens (`token_bytes`, (V,), separators 0), not an average.
    """
    T = model.config.block_size
    n = (len(tokens) - 1) // T
    if cfg.evaluate.test_windows:
        n = min(n, cfg.evaluate.test_windows)
    if n < 1:
        raise LmforgeError(f"test shard has {len(tokens)} tokens; need more than {T + 1}")
    calib = M.CalibrationAccumulator(cfg.evaluate.calibration_bins)
    nll_rows = []
    n_bytes = torch.zeros((), dtype=torch.int64)
    for start in range(0, n, 16):
        idx = range(start, min(start + 16, n))
        window = np.stack([tokens[i * T : i * T + T + 1] for i in idx]).astype(np.int64)
        chunk = torch.from_numpy(window)  # (B, T+1)
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits, _ = model(x)  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        nll_rows.append(nll)  # (B, T)
        n_bytes += M.target_bytes(y, token_bytes)
        calib.update(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    nll = torch.cat(nll_rows)  # (n, T)
    return {
        **M.lm_scores(nll.reshape(-1), int(n_bytes)),
        "loss_by_position": M.loss_by_position(nll),
        "calibration": calib.result(),
        "tokens_scored": nll.numel(),
    }


def scoring_windows(n: int, T: int) -> list[tuple[int, int, int]]:
    """The model calls that score a sequence of `n` tokens once each: (start, length, first).

    A call feeds `seq[start : start + length]` and scores the targets of positions
    `first .. length-1`, i.e. tokens `seq[start + first + 1 .. start + length]`. Token t
    (1 <= t < n) is always predicted from its min(t, T) previous tokens, the most the
    model can see:

    - the first window feeds seq[:T] and scores tokens 1..T with all their history;
    - every later token t > T gets a window of its own, seq[t-T : t], and only its last
      position is scored (a stride of one token).

    Why stride 1: it is the only choice that gives every token the full context, which is
    the definition of the model's probability of a long document under a T-token window.
    A stride S > 1 (e.g. T/2) would be S times cheaper but would predict some tokens from
    as few as T-S of their previous tokens, i.e. score a weaker model than the one trained
    and bias the KL rate upwards. The cost is one length-T call per token beyond the first
    T, batched; at the default sizes story-world documents fit one window, and the report
    counts the documents that did not (`multi_window_docs`).
    """
    if n < 2:
        return []
    first = (0, min(n - 1, T), 0)
    return [first] + [(t - T, T, T - 1) for t in range(T + 1, n)]


@torch.no_grad()
def doc_bits(model: GPT, docs_ids: list[list[int]], eot: int, batch: int = 32) -> list[float]:
    """Total -log2 Q(doc) of each whole document, its end-of-text included, given a preceding EOT.

    Every token of `[EOT, *doc, EOT]` after the first is predicted exactly once, with
    min(t, block_size) tokens of context (see `scoring_windows`), however long the document.
    """
    T = model.config.block_size
    seqs = [[eot, *ids, eot] for ids in docs_ids]
    calls = [(d, w) for d, s in enumerate(seqs) for w in scoring_windows(len(s), T)]
    totals = [0.0] * len(seqs)  # nats per document, summed in a fixed order
    for start in range(0, len(calls), batch):
        group = calls[start : start + batch]
        length = max(w[1] for _, w in group)
        x = torch.full((len(group), length), eot, dtype=torch.long)  # (B, L) padded inputs
        y = torch.full((len(group), length), -1, dtype=torch.long)  # (B, L) -1: not scored
        for row, (d, (s0, n, first)) in enumerate(group):
            s = torch.tensor(seqs[d][s0 : s0 + n + 1])  # (n+1,) inputs and their next tokens
            x[row, :n] = s[:-1]
            y[row, first:n] = s[1 + first :]
        logits, _ = model(x)  # (B, L, V)
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), y, ignore_index=-1, reduction="none"
        )  # (B, L), 0 where not scored
        for (d, _), value in zip(group, nll.to(torch.float64).sum(1).tolist(), strict=True):
            totals[d] += value
    return [v / LN2 for v in totals]


def source_kl(model: GPT, tok, eot: int, cfg: Config) -> dict[str, Any]:
    """KL rate (bits/byte, with CI) to each exact source available: story world, mimic."""
    n, results = cfg.evaluate.source_docs, {}
    seed = derive_seed(cfg.seed, STAGE, "fresh-source")
    sources: dict[str, tuple[list[str], list[float]]] = {}
    if any(s.kind == "storyworld" for s in cfg.validate.sources):
        from pipeline.data.storyworld import StoryWorld

        world, rng = StoryWorld(storyworld_spec(cfg)), random.Random(seed)
        stories = [world.sample(rng) for _ in range(n)]
        sources["storyworld"] = ([s.text for s in stories], [-s.log_prob / LN2 for s in stories])
    mimic_path = cfg.path("synthetic") / "mimic.json"
    if mimic_path.is_file():
        from pipeline.data.ngram import NGramModel

        mimic = NGramModel.load(mimic_path)
        docs = mimic.generate(n, seed, cfg.synthesize.mimic.max_chars)
        sources["mimic"] = (docs, [-mimic.log_prob(d) / LN2 for d in docs])
    T = model.config.block_size
    for name, (docs, source_bits) in sources.items():
        ids = encode_docs(tok, docs)
        model_bits = doc_bits(model, ids, eot)
        n_bytes = [len(d.encode("utf-8")) for d in docs]
        results[name] = {
            **M.kl_rate(model_bits, source_bits, n_bytes),
            # whole documents are scored: this many needed more than one model window
            "multi_window_docs": sum(len(scoring_windows(len(d) + 2, T)) > 1 for d in ids),
        }
    return results


def sharpness_table(cfg: Config, test_tokens: np.ndarray) -> dict[str, dict[str, Any]]:
    """Epsilon-sharpness and the extreme Hessian eigenvalues of each fine-tuning method's weights.

    Per method: `test_loss`, `sharpness`, `hessian_max_eig` / `hessian_min_eig` (largest and
    smallest, by Lanczos: see pipeline/eval/sharpness.py), their residuals and whether both
    converged.
    """
    from pipeline.eval.sharpness import epsilon_sharpness, hessian_extreme_eigenvalues

    folder, f = cfg.path("finetune"), cfg.finetune
    methods = (
        sorted(p.name for p in (folder / "methods").iterdir())
        if (folder / "methods").is_dir()
        else []
    )
    weights = {m: folder / "methods" / m / "model.safetensors" for m in methods} or {
        f.method: folder / "model.safetensors"
    }
    model0 = load_model(folder)
    seed = derive_seed(cfg.seed, STAGE, "sharpness")
    batches = list(
        eval_batches(
            test_tokens, seed, cfg.evaluate.sharpness_batches, 8, model0.config.block_size, 0, 1
        )
    )

    def loss_fn(m: torch.nn.Module) -> torch.Tensor:
        return sum(m(x, y)[1] for x, y in batches) / len(batches)

    table = {}
    for method, path in weights.items():
        model = load_model(folder, path)
        sharp = epsilon_sharpness(model, loss_fn, f.sharpness_rho, f.sharpness_steps)
        eig = hessian_extreme_eigenvalues(model, loss_fn, iters=f.hessian_iters)
        table[method] = {
            "sharpness": sharp["sharpness"],
            "hessian_max_eig": eig["max"],
            "hessian_min_eig": eig["min"],
            "hessian_max_residual": eig["max_residual"],
            "hessian_min_residual": eig["min_residual"],
            "hessian_converged": eig["max_converged"] and eig["min_converged"],
            "test_loss": sharp["base_loss"],
        }
    return table


def prompts_and_references(cfg: Config) -> tuple[list[str], list[str]]:
    """Prompts (first sentences of fresh stories, or starts of test docs) and held-out texts."""
    e = cfg.evaluate
    refs = pq.read_table(cfg.path("validated") / "test.parquet", columns=["text"])
    references = refs.column("text").to_pylist()[: max(e.prompts, 50)]
    if any(s.kind == "storyworld" for s in cfg.validate.sources):
        from pipeline.data.storyworld import StoryWorld

        world = StoryWorld(storyworld_spec(cfg))
        rng = random.Random(derive_seed(cfg.seed, STAGE, "prompts"))
        prompts = [world.sample(rng).text.split(". ")[0] + "." for _ in range(e.prompts)]
    else:
        prompts = [d[: cfg.synthesize.continuation_chars] for d in references[: e.prompts]]
    return prompts, references


def decode_all(model: GPT, tok, eot: int, prompts: list[str], cfg: Config) -> dict[str, list[str]]:
    """Generations (prompt + continuation) per decoding strategy."""
    e, T = cfg.evaluate, model.config.block_size
    seed = derive_seed(cfg.seed, STAGE, "decode") % 2**31
    # Prompt and continuation share the context: leave at least half of it to the prompt.
    n = min(e.max_new_tokens, T // 2)
    strategies = {
        "greedy": DecodeConfig("greedy", n, eos_id=eot),
        "beam": DecodeConfig(
            "beam", n, num_beams=e.num_beams, length_penalty=e.length_penalty, eos_id=eot
        ),
        "temperature": DecodeConfig("sample", n, e.temperature, eos_id=eot, seed=seed),
        "top_k": DecodeConfig("sample", n, 1.0, top_k=e.top_k, eos_id=eot, seed=seed),
        "top_p": DecodeConfig("sample", n, 1.0, top_p=e.top_p, eos_id=eot, seed=seed),
    }
    prompt_ids = encode_docs(tok, prompts)
    out: dict[str, list[str]] = {}
    for name, dcfg in strategies.items():
        texts = []
        for p, ids in zip(prompts, prompt_ids, strict=True):
            new = generate(model, [eot, *ids], dcfg)  # the prompt is cropped to fit T
            texts.append(p + decode(tok, _until(new, eot)))
        out[name] = texts
    return out


def _until(ids, eot: int) -> list[int]:
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return ids[: ids.index(eot)] if eot in ids else ids


def generation_quality(gens: dict[str, list[str]], refs: list[str], cfg: Config) -> dict:
    """Per strategy: distinct-n, repetition, MMD and precision/recall, validity."""
    is_valid = None
    if any(s.kind == "storyworld" for s in cfg.validate.sources):
        from pipeline.data.storyworld import StoryWorld

        is_valid = StoryWorld(storyworld_spec(cfg)).is_valid
    ref_feats = M.ngram_features(refs)
    table = {}
    for name, texts in gens.items():
        feats = M.ngram_features(texts)
        row = {
            "distinct_1": M.distinct_n(texts, 1),
            "distinct_2": M.distinct_n(texts, 2),
            "repetition_4": M.repetition_rate(texts, 4),
            "mmd2": M.mmd2(feats, ref_feats),
            **M.precision_recall_knn(ref_feats, feats),
        }
        if is_valid is not None:
            row["validity_rate"] = M.validity_rate(texts, is_valid)
        table[name] = row
    return table


def task_accuracy(model: GPT, tok, eot: int, cfg: Config) -> float | None:
    path = cfg.path("synthetic") / "finetune_test.jsonl"
    if not path.is_file():
        return None
    task = tokenize(tok, read_examples(path), eot, model.config.block_size)
    return evaluate_task(model, task, eot, 32, torch.device("cpu"))["task_accuracy"]


def markdown(report: dict[str, Any], gens: dict[str, list[str]], k: int) -> str:
    t = report["test"]
    lines = [
        "# Evaluation",
        "",
        "## Held-out test split",
        "",
        "| cross-entropy (nats/token) | perplexity | bits/byte | ECE | Brier | entropy |",
        "|---|---|---|---|---|---|",
        f"| {t['cross_entropy']:.4f} | {t['perplexity']:.3f} | {t['bits_per_byte']:.4f} | "
        f"{t['calibration']['ece']:.4f} | {t['calibration']['brier']:.4f} | "
        f"{t['calibration']['entropy']:.4f} |",
        "",
        "## KL rate to the true source",
        "",
        "Whole documents are scored, each token once with up to the model's full context;",
        "the last column counts the documents longer than one context window.",
        "",
        "| source | model bits/byte | source entropy bits/byte | KL bits/byte | 95% CI "
        "| docs | docs over one window |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in report["source_kl"].items():
        lines.append(
            f"| {name} | {r['model_bits_per_byte']:.4f} | {r['source_bits_per_byte']:.4f}"
            f" | {r['kl_bits_per_byte']:.4f} | [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
            f" | {r['num_docs']} | {r['multi_window_docs']} |"
        )
    lines += [
        "",
        "## Sharpness of the fine-tuned weights",
        "",
        "| method | test loss | epsilon-sharpness | largest Hessian eig. "
        "| smallest Hessian eig. | converged |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in report["sharpness"].items():
        lines.append(
            f"| {m} | {r['test_loss']:.4f} | {r['sharpness']:.4g} | {r['hessian_max_eig']:.4g}"
            f" | {r['hessian_min_eig']:.4g} | {'yes' if r['hessian_converged'] else 'no'} |"
        )
    lines += ["", *(f"- {s}" for s in report.get("flatness", []))]
    cols = list(next(iter(report["generation"].values())))
    lines += [
        "",
        "## Decoding",
        "",
        "| strategy | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for s, r in report["generation"].items():
        lines.append(f"| {s} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
    if report.get("task_accuracy") is not None:
        lines += [
            "",
            f"Exact-match accuracy on the fine-tuning test split: {report['task_accuracy']:.4f}",
        ]
    lines += ["", "## Samples", ""]
    for s, texts in gens.items():
        lines += [f"### {s}", ""] + [f"- {t!r}" for t in texts[:k]] + [""]
    return "\n".join(lines) + "\n"


def run(cfg: Config) -> dict[str, Any]:
    """Evaluate the fine-tuned model; write reports/evaluate.{json,md} and plots."""
    from pipeline.ops.tracking import start_run

    torch.manual_seed(derive_seed(cfg.seed, STAGE, "torch") % 2**63)
    tok_dir = cfg.path("tokenizer")
    meta, tok = read_meta(tok_dir), load_tokenizer(tok_dir / "tokenizer.json")
    eot, test_meta = meta["eot_id"], meta["splits"]["test"]
    test_tokens = read_shard(tok_dir / test_meta["file"], test_meta)
    token_bytes = token_byte_lengths(tok)  # (V,) exact bytes per id, separators 0
    check_text_bytes(tok_dir / test_meta["file"], test_tokens, token_bytes, test_meta["bytes"])
    model = load_model(cfg.path("finetune"))
    with start_run(cfg, STAGE) as tracker:
        tracker.log_params({"seed": cfg.seed, STAGE: dataclasses.asdict(cfg.evaluate)})
        report: dict[str, Any] = {
            "test": test_scores(model, test_tokens, cfg, torch.from_numpy(token_bytes)),
            "source_kl": source_kl(model, tok, eot, cfg),
            "sharpness": sharpness_table(cfg, test_tokens),
            "task_accuracy": task_accuracy(model, tok, eot, cfg),
        }
        # What the numbers show, "NOT flatter" included: the same sentences finetune writes.
        report["flatness"] = flatness_verdict(report["sharpness"])
        prompts, refs = prompts_and_references(cfg)
        gens = decode_all(model, tok, eot, prompts, cfg)
        report["generation"] = generation_quality(gens, refs, cfg)
        reports = cfg.path("reports")
        atomic_write_text(
            reports / f"{STAGE}.md", markdown(report, gens, cfg.evaluate.samples_in_report)
        )
        atomic_write_json(
            reports / "plots" / "loss_by_position.json",
            [
                {"position": i, "loss": v}
                for i, v in enumerate(report["test"].pop("loss_by_position"))
            ],
        )
        diagram = report["test"]["calibration"].pop("diagram")
        atomic_write_json(reports / "plots" / "reliability.json", diagram)
        atomic_write_json(reports / f"{STAGE}.json", report)
        tracker.log_metrics(_flat_numbers(report))
        for name in (f"{STAGE}.md", f"{STAGE}.json"):
            tracker.log_artifact(reports / name)
        png = M.reliability_png(diagram, reports / "plots" / "reliability.png")
        if png:
            tracker.log_artifact(png, "plots")
    return {
        "bits_per_byte": report["test"]["bits_per_byte"],
        "kl": {k: v["kl_bits_per_byte"] for k, v in report["source_kl"].items()},
    }


def _flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{prefix}{k}."))
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
