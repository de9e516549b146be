"""Stage evaluate: every report section, the source-as-model KL check, and determinism."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cfg_for, prepared_project

from pipeline.core.progress import LOGGER_NAME, parse_line
from pipeline.data.ingest import storyworld_spec
from pipeline.data.storyworld import StoryWorld
from pipeline.eval import lm as M
from pipeline.eval import scoring
from pipeline.model.load import load_model
from pipeline.stages import evaluate, finetune, pretrain, synthesize, tokenizer, validate
from pipeline.text.shards import read_meta
from pipeline.text.tokenizer import encode_docs, load_tokenizer, token_byte_lengths

SMALL = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=64",
    "pretrain.micro_batch_size=8",
    "pretrain.tokens_per_step=512",
    "pretrain.max_steps=20",
    "pretrain.eval_interval=20",
    "pretrain.eval_batches=1",
    "finetune.max_steps=4",
    "finetune.micro_batch_size=4",
    "finetune.eval_examples=8",
    "finetune.sharpness_steps=2",
    "finetune.hessian_iters=3",
    "evaluate.source_docs=60",
    "evaluate.prompts=6",
    "evaluate.test_windows=16",
    "evaluate.max_new_tokens=16",
]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    return prepared_project(
        tmp_path_factory.mktemp("ev"),
        ["synthesize.finetune_docs=40", *SMALL],
        [validate, synthesize, tokenizer, pretrain, finetune],
    )


@pytest.fixture(scope="module")
def evaluated(finetuned) -> Path:
    """The fine-tuned project after one evaluate run (its reports are the module's)."""
    evaluate.run(cfg_for(finetuned))
    return finetuned


def test_report_has_every_section(evaluated):
    cfg = cfg_for(evaluated)
    report = json.loads((cfg.path("reports") / "evaluate.json").read_text())
    test = report["test"]
    assert test["perplexity"] == pytest.approx(2.718281828 ** test["cross_entropy"], rel=1e-6)
    assert 0 < test["bits_per_byte"] < 10
    assert {"ece", "brier", "entropy"} <= set(test["calibration"])
    for source in ("storyworld", "mimic"):
        kl = report["source_kl"][source]
        assert kl["ci_low"] <= kl["kl_bits_per_byte"] <= kl["ci_high"]
        assert kl["kl_bits_per_byte"] == pytest.approx(
            kl["model_bits_per_byte"] - kl["source_bits_per_byte"]
        )
    assert set(report["sharpness"]) == set(finetune.METHODS)
    # The sentences say what the measured numbers show, one per method against adamw.
    for m in set(finetune.METHODS) - {"adamw"}:
        said = [s for s in report["flatness"] if s.startswith(f"{m} is ")]
        r, base = report["sharpness"][m], report["sharpness"]["adamw"]
        flatter = r["sharpness"] < base["sharpness"]
        claims = said[0].startswith(f"{m} is flatter than adamw by ε-sharpness")
        assert len(said) == 1 and claims == flatter
    assert set(report["generation"]) == {"greedy", "beam", "temperature", "top_k", "top_p"}
    for row in report["generation"].values():
        assert 0 <= row["validity_rate"] <= 1 and 0 <= row["distinct_1"] <= 1
    assert 0 <= report["task_accuracy"] <= 1
    # At block_size 64 most story-world docs are longer than one window: all are scored.
    kl = report["source_kl"]["storyworld"]
    assert 0 < kl["multi_window_docs"] <= kl["num_docs"] == cfg.evaluate.source_docs
    md = (cfg.path("reports") / "evaluate.md").read_text()
    assert "## KL rate to the true source" in md and "| storyworld |" in md
    assert "docs over one window" in md
    assert all(f"- {s}" in md for s in report["flatness"])
    assert f"| {kl['num_docs']} | {kl['multi_window_docs']} |" in md
    plots = cfg.path("reports") / "plots"
    curve = json.loads((plots / "loss_by_position.json").read_text())
    assert len(curve) == cfg.model.block_size
    assert (plots / "reliability.json").is_file()
    assert (plots / "loss_by_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The baselines scored the very text of the model's test shard (same documents, bytes).
    b, shard = report["baselines"], read_meta(cfg.path("tokenizer"))["splits"]["test"]
    assert (b["test_docs"], b["test_bytes"]) == (shard["docs"], shard["bytes"])
    assert b["gain_over_ngram"] == pytest.approx(
        b["ngram"]["bits_per_byte"] - test["bits_per_byte"]
    )
    assert b["model_scores_whole_split"] is False  # evaluate.test_windows=16 here
    assert "## Baselines on the test split" in md and "| this model |" in md
    sampled = report["source_kl"]["storyworld"]["sampling"]
    assert set(sampled) == {"temperature", "top_k", "top_p"}
    assert all(0 <= r["never_produced"] <= 1 for r in sampled.values())
    assert "| storyworld | temperature |" in md
    task = report["task"]
    assert task["kind"] == "qa" and task["exact_match"] == report["task_accuracy"]


def test_rerun_gives_the_same_report_and_logs_each_part(evaluated, caplog):
    cfg = cfg_for(evaluated)
    first = (cfg.path("reports") / "evaluate.json").read_bytes()
    caplog.set_level(logging.INFO)
    evaluate.run(cfg)
    assert (cfg.path("reports") / "evaluate.json").read_bytes() == first
    # Off a terminal: one progress line per part, then the last one, with the ETA the
    # flow's stage line shows; and each part by name with its seconds.
    lines = [parse_line(r.getMessage()) for r in caplog.records if r.name == LOGGER_NAME]
    n = len(evaluate.PARTS)
    assert [(x.what, x.done, x.total, x.final) for x in lines] == [
        *(("evaluate", str(i), str(n), False) for i in range(1, n + 1)),
        ("evaluate", str(n), str(n), True),
    ]
    assert lines[0].eta.endswith("s") and lines[-1].eta == "0s"
    took = [r.getMessage() for r in caplog.records if " took " in r.getMessage()]
    assert [t.split(" took ")[0] for t in took] == [f"evaluate: {p}" for p in evaluate.PARTS]


def test_a_model_that_is_the_source_scores_zero_kl(finetuned):
    """The KL path of the stage, fed the source's own bits as the model's, gives exactly 0."""
    cfg = cfg_for(finetuned)
    world = StoryWorld(storyworld_spec(cfg))
    rng = random.Random(0)
    stories = [world.sample(rng) for _ in range(50)]
    bits = [-s.log_prob / M.LN2 for s in stories]
    kl = M.kl_rate(bits, bits, [len(s.text.encode()) for s in stories])
    assert kl["kl_bits_per_byte"] == 0 and kl["ci_low"] == kl["ci_high"] == 0


def test_doc_bits_match_a_token_by_token_computation(finetuned):
    cfg = cfg_for(finetuned)
    model = load_model(cfg.path("finetune"))
    ids = [[5, 17, 42], [7, 7]]
    got = scoring.doc_bits(model, ids, eot=0)
    for doc, bits in zip(ids, got, strict=True):
        seq = torch.tensor([[0, *doc, 0]])
        logits, _ = model(seq[:, :-1])
        logp = torch.log_softmax(logits[0], -1)
        want = -sum(logp[i, t].item() for i, t in enumerate(seq[0, 1:].tolist())) / M.LN2
        assert bits == pytest.approx(want, rel=1e-5)


def brute_force_bits(model, seq: list[int]) -> float:
    """-log2 Q(seq[1:] | seq[0]): token t fed its previous min(t, T) tokens, one call each."""
    T = model.config.block_size
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(seq)):
            logits, _ = model(torch.tensor([seq[max(0, t - T) : t]]))  # (1, <=T, V)
            total -= torch.log_softmax(logits[0, -1].double(), -1)[seq[t]].item()
    return total / M.LN2


@pytest.mark.parametrize("T", [1, 3, 8])
def test_scoring_windows_predict_each_token_once_with_full_context(T):
    for n in range(4 * T + 3):
        predicted = []
        for start, length, first in scoring.scoring_windows(n, T):
            assert 1 <= length <= T and start >= 0 and start + length < n
            for j in range(first, length):  # position j predicts token start + j + 1
                t = start + j + 1
                assert j + 1 == min(t, T)  # its context: all of seq[start : t]
                predicted.append(t)
        assert predicted == list(range(1, n))  # every token after the first, once


def test_doc_bits_score_a_long_document_whole(finetuned):
    """A document three times the context, scored by the stage, equals the brute force."""
    cfg = cfg_for(finetuned)
    model = load_model(cfg.path("finetune"))
    T, V = model.config.block_size, read_meta(cfg.path("tokenizer"))["vocab_size"]
    rng = random.Random(0)
    docs = [[rng.randrange(1, V) for _ in range(n)] for n in (3 * T, T - 1, T, T + 1, 1)]
    got = scoring.doc_bits(model, docs, eot=0, batch=7)  # batches mix documents
    for doc, bits in zip(docs, got, strict=True):
        want = brute_force_bits(model, [0, *doc, 0])
        assert abs(bits - want) < 1e-4, (len(doc), bits, want)


def test_test_split_bits_per_byte_use_the_exact_bytes(finetuned):
    """bpb of a whole stream = its total nll / ln 2 / the UTF-8 bytes of its text."""
    cfg = cfg_for(finetuned, "evaluate.test_windows=0")
    model = load_model(cfg.path("finetune"))
    tok = load_tokenizer(cfg.path("tokenizer") / "tokenizer.json")
    T = model.config.block_size
    world = StoryWorld(storyworld_spec(cfg))
    rng = random.Random(3)
    texts = [world.sample(rng).text for _ in range(6)] + ["Naïve café, 日本語 🙂."]
    stream = [0]
    for ids in encode_docs(tok, texts):
        stream += [*ids, 0]
    windows = -(-(len(stream) - 1) // T)
    stream += [0] * (windows * T + 1 - len(stream))  # separators (0 bytes) fill the last window
    tokens = np.array(stream, dtype=np.uint16)
    got = scoring.test_scores(model, tokens, cfg, torch.from_numpy(token_byte_lengths(tok)))

    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    nats = 0.0
    with torch.no_grad():
        for i in range(windows):
            chunk = torch.from_numpy(tokens[i * T : i * T + T + 1].astype(np.int64))  # (T+1,)
            logp = torch.log_softmax(model(chunk[None, :-1])[0][0].double(), -1)  # (T, V)
            nats -= logp.gather(1, chunk[1:, None]).sum().item()
    assert got["num_bytes"] == n_bytes and got["tokens_scored"] == len(stream) - 1
    assert got["bits_per_byte"] == pytest.approx(nats / M.LN2 / n_bytes, rel=1e-6)


def test_task_answer_bits_per_byte_match_a_loop_over_examples(finetuned):
    """Answer bits/byte from the batched scorer = one forward pass per example, by hand."""
    from pipeline.eval.decoding import task_scores
    from pipeline.text.task_data import read_examples

    cfg = cfg_for(finetuned)
    tok_dir = cfg.path("tokenizer")
    tok, eot = load_tokenizer(tok_dir / "tokenizer.json"), read_meta(tok_dir)["eot_id"]
    model = load_model(cfg.path("finetune"))
    rows = read_examples(cfg.path("synthetic") / "finetune_test.jsonl")
    bits, n_bytes = 0.0, 0
    with torch.no_grad():
        for row in rows:
            p, a = encode_docs(tok, [row["prompt"]])[0], encode_docs(tok, [row["answer"]])[0]
            seq, T = p + a + [eot], model.config.block_size
            # A story longer than the context keeps its last T tokens, as the scorer does.
            x, y = seq[:-1][-T:], seq[1:][-T:]
            logp = torch.log_softmax(model(torch.tensor([x]))[0][0].float(), dim=-1)  # (T, V)
            for i in range(len(y) - len(a) - 1, len(y)):  # each answer token and the end
                bits -= logp[i, y[i]].item() / np.log(2)
            n_bytes += len(row["answer"].encode())
    got = task_scores(model, tok, eot, cfg, "qa")
    assert got["examples"] == len(rows)
    assert got["answer_bits_per_byte"] == pytest.approx(bits / n_bytes, rel=1e-4)
    assert "exact_match" not in task_scores(model, tok, eot, cfg, "continuation")


def brute_force_filtered_bits(model, seq: list[int], temperature: float, top_k: int) -> float:
    """-log2 of seq[1:] under temperature/top-k sampling, by hand: one call per token, the
    k largest logits kept, the rest never sampled."""
    T, total = model.config.block_size, 0.0
    with torch.no_grad():
        for t in range(1, len(seq)):
            logits = model(torch.tensor([seq[max(0, t - T) : t]]))[0][0, -1].double()  # (V,)
            kept = logits.topk(top_k).indices if top_k else torch.arange(len(logits))
            if seq[t] not in kept.tolist():
                return float("inf")
            z = logits[kept] / temperature
            total -= (z[kept.tolist().index(seq[t])] - torch.logsumexp(z, 0)).item()
    return total / M.LN2


def test_sampling_code_lengths_match_a_token_by_token_computation(finetuned):
    """doc_bits_under each strategy's filter = the sampling process's own probability."""
    from functools import partial

    from pipeline.model.generate import filter_logits

    model = load_model(cfg_for(finetuned).path("finetune"))
    V = model.config.vocab_size
    ids = [[5, 17, 42, 9], [7, 7], list(range(1, 80))]  # the last spans two windows (T=64)
    filters = {
        "t0.7": partial(filter_logits, temperature=0.7),
        "top_k": partial(filter_logits, top_k=V // 2),
        "top_1": partial(filter_logits, top_k=1),  # greedy as a distribution: mostly inf
    }
    got = scoring.doc_bits_under(model, ids, 0, {"model": None, **filters}, batch=5)
    for d, doc in enumerate(ids):
        seq = [0, *doc, 0]
        assert got["model"][d] == pytest.approx(brute_force_bits(model, seq), rel=1e-4)
        assert got["t0.7"][d] == pytest.approx(
            brute_force_filtered_bits(model, seq, 0.7, 0), rel=1e-4
        )
        want = brute_force_filtered_bits(model, seq, 1.0, V // 2)
        assert got["top_k"][d] == pytest.approx(want, rel=1e-4)
        assert got["top_1"][d] == brute_force_filtered_bits(model, seq, 1.0, 1)
    assert float("inf") in got["top_1"]  # these documents are not all greedy's own output
