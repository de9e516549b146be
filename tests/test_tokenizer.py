"""The byte-level BPE (round trip, determinism, special tokens, load errors) and stage tokenizer."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, cfg_for, make_project
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from pipeline.core.errors import LmforgeError
from pipeline.core.io import tree_md5
from pipeline.eval import lm as M
from pipeline.stages import synthesize, validate
from pipeline.stages import tokenizer as stage
from pipeline.text import encode
from pipeline.text.encode import input_paths
from pipeline.text.shards import load_split, read_header, read_meta, text_bytes
from pipeline.text.tokenizer import (
    EOT,
    TokenizerError,
    bytes_per_token,
    decode,
    encode_docs,
    end_of_text,
    load_tokenizer,
    new_tokenizer,
    token_byte_lengths,
    train_bpe,
)

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "tree", "little", "big"]
EXOTIC = ["naïve", "日本語のテキスト", "🙂👍🏽", "e\u0301", "\x00\x07", "\r\n\t", "Ωμέγα", "ﬁ"]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Small synthetic texts: mostly English-like words, a few non-ASCII pieces."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS + EXOTIC[:2]) for _ in range(rng.randint(5, 30))).capitalize()
        + "."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(corpus(), vocab_size=400, special_tokens=[EOT], min_frequency=2)


@settings(max_examples=300, deadline=None)
@given(
    st.text()
    | st.lists(st.sampled_from([*EXOTIC, *WORDS, EOT, " ", "<|", "|>"])).map("".join)
    | st.text(st.characters(codec="utf-8", categories=["Cc", "Mn", "So", "Lo", "Zs"]))
)
@example("")
@example(EOT)
@example(f"the cat{EOT}sat {EOT}{EOT}")
@example("🙂👍🏽 日本語 e\u0301 \x00 \ufeff \U0010ffff")
def test_decode_encode_round_trip(tok, text):
    (ids,) = encode_docs(tok, [text])
    assert decode(tok, ids) == text
    assert decode(tok, np.array(ids, dtype=np.uint16)) == text
    assert 0 not in ids  # a literal <|endoftext|> in a document is text, not the separator


def test_encode_docs_matches_single_encodes(tok):
    docs = corpus(50, seed=1)
    batch = encode_docs(tok, docs)
    assert batch == [tok.encode(d, add_special_tokens=False).ids for d in docs]
    assert all(len(ids) < len(d.encode()) for ids, d in zip(batch, docs, strict=True))


def test_training_is_deterministic(tok):
    again = train_bpe(iter(corpus()), vocab_size=400, special_tokens=[EOT], min_frequency=2)
    assert again.to_str() == tok.to_str()
    # Another process too: Rust hash maps are seeded per process, ties must not depend on it.
    code = (
        "import sys; sys.path.insert(0, 'tests'); from test_tokenizer import corpus;"
        "from pipeline.text.tokenizer import EOT, train_bpe;"
        "print(train_bpe(corpus(), 400, [EOT], 2).to_str(), end='')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout == tok.to_str()
    assert 300 < tok.get_vocab_size() <= 400  # a small corpus can run out of pairs


def test_end_of_text_is_the_first_special_token_as_meta_json_names_it():
    """The EOT is `special_tokens[0]` / `eot_id` of meta.json, whatever the token's text."""
    t = train_bpe(corpus(100), vocab_size=320, special_tokens=["<|end|>", EOT], min_frequency=2)
    meta = {"special_tokens": ["<|end|>", EOT], "eot_id": 0}
    assert (
        end_of_text(t, meta, "meta.json") == ("<|end|>", 0) == ("<|end|>", t.token_to_id("<|end|>"))
    )
    assert end_of_text(t, None, "tokenizer.json") == ("<|end|>", 0)  # no meta: the id-0 special
    with pytest.raises(
        TokenizerError, match=r"m/meta\.json: eot_id 1 is not .*'<\|end\|>' \(got 0\)"
    ):
        end_of_text(t, {**meta, "eot_id": 1}, "m/meta.json")
    with pytest.raises(TokenizerError, match=r"meta\.json: eot_id 0 .*'<\|eos\|>' \(got None\)"):
        end_of_text(t, {**meta, "special_tokens": ["<|eos|>"]}, "meta.json")
    with pytest.raises(
        TokenizerError, match=r"meta\.json: special_tokens: expected a non-empty list"
    ):
        end_of_text(t, {"special_tokens": [], "eot_id": 0}, "meta.json")
    plain = new_tokenizer()  # no special token at id 0 at all
    plain.add_tokens(["abc"])
    with pytest.raises(TokenizerError, match=r"tok\.json: no special token at id 0"):
        end_of_text(plain, None, "tok.json")


def test_special_token_ids():
    specials = [EOT, "<|pad|>", "<|user|>"]
    t = train_bpe(corpus(100), vocab_size=320, special_tokens=specials, min_frequency=2)
    assert [t.token_to_id(s) for s in specials] == [0, 1, 2]
    assert decode(t, [0, 1]) == EOT + "<|pad|>"  # decode keeps special tokens as text
    with pytest.raises(TokenizerError, match="distinct"):
        train_bpe(corpus(10), vocab_size=300, special_tokens=[EOT, EOT], min_frequency=2)
    with pytest.raises(TokenizerError, match="vocab_size: 256 is below"):
        train_bpe(corpus(10), vocab_size=256, special_tokens=[EOT], min_frequency=2)


def test_bytes_per_token(tok):
    texts = corpus(100, seed=2)
    n_bytes = sum(len(t.encode()) for t in texts)
    n_tokens = sum(map(len, encode_docs(tok, texts)))
    assert bytes_per_token(tok, iter(texts), batch_docs=7) == pytest.approx(n_bytes / n_tokens)
    assert bytes_per_token(tok, texts) > 1.5


def hand_tokenizer() -> Tokenizer:
    """A byte-level BPE with a hand-written vocabulary, so every token's bytes are known.

    Ids: 0 `<|endoftext|>` (special), 1..256 the byte symbols, then four merges: `Ã¯`
    (the two UTF-8 bytes c3 af of "ï"), `Ġc`, `Ġca`, `Ġcat` (" cat", Ġ is the space).
    """
    vocab = {EOT: 0}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    merges = [("Ã", "¯"), ("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([EOT])
    return t


def test_token_byte_lengths_hand_counted():
    t = hand_tokenizer()
    text = "naïve cat 🙂"
    (ids,) = encode_docs(t, [text])
    pieces = [t.id_to_token(i) for i in ids]
    assert pieces == ["n", "a", "Ã¯", "v", "e", "Ġcat", "Ġ", "ð", "Ł", "Ļ", "Ĥ"]
    # n a ï v e: 1 1 2 1 1; " cat": 4; " ": 1; the emoji U+1F642 is f0 9f 99 82, one byte
    # per token (no merge joins them).
    hand = [1, 1, 2, 1, 1, 4, 1, 1, 1, 1, 1]
    table = token_byte_lengths(t)
    assert table.shape == (t.get_vocab_size(),) and table.dtype == np.int64
    assert table[ids].tolist() == hand
    assert sum(hand) == len(text.encode("utf-8")) == 15
    assert table[0] == 0  # the separator is not text
    # Decoding one emoji byte alone gives U+FFFD (3 bytes): why the table is not built
    # by decoding tokens one at a time.
    assert len(t.decode([ids[-1]]).encode()) == 3


def test_token_bytes_sum_to_the_text_bytes(tok):
    table = token_byte_lengths(tok)
    texts = [*corpus(60, seed=3), *EXOTIC, f"a literal {EOT} is text"]
    for text, ids in zip(texts, encode_docs(tok, texts), strict=True):
        assert int(table[ids].sum()) == len(text.encode("utf-8")), text


def test_bits_per_byte_over_a_whole_stream(tok):
    """bpb over the stream `EOT doc EOT doc EOT ...` = total nll / ln 2 / len(text.encode())."""
    texts = [*corpus(20, seed=4), *EXOTIC]
    stream = [0]
    for ids in encode_docs(tok, texts):
        stream += [*ids, 0]
    targets = torch.tensor(stream[1:])  # (N,) every token after the first is scored
    nll = torch.rand(len(targets), generator=torch.Generator().manual_seed(0)) * 5  # (N,)
    n_bytes = int(M.target_bytes(targets, torch.from_numpy(token_byte_lengths(tok))))
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert n_bytes == total_bytes
    got = M.lm_scores(nll, n_bytes)["bits_per_byte"]
    assert got == pytest.approx(float(nll.double().sum()) / math.log(2) / total_bytes, rel=1e-12)


def test_save_load_and_load_errors_name_the_file(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(tok.to_str())
    assert load_tokenizer(path).to_str() == tok.to_str()
    with pytest.raises(TokenizerError, match=r"missing\.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("not json {")
    with pytest.raises(TokenizerError, match=r"bad\.json: not a JSON file"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(TokenizerError, match=r"bad\.json: not a tokenizer"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(TokenizerError, match=r"bad\.json: not a valid tokenizer"):
        load_tokenizer(bad)


# --------------------------------------------------------------------------------------
# The stage, end to end on a tiny project
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    """A project whose validate and synthesize stages have run (shared: they take ~4 s)."""
    root = make_project(tmp_path_factory.mktemp("tok") / "proj")
    cfg = cfg_for(
        root,
        "validate.sources=[{kind: storyworld, num_docs: 300}]",
        "synthesize.entropy_docs=200",
        "synthesize.finetune_docs=50",
        "tokenizer.encode_batch_docs=64",  # several batches per split
    )
    validate.run(cfg)
    synthesize.run(cfg)
    return cfg


def test_stage_writes_shards_that_match_meta(synthesized):
    cfg = synthesized
    report = stage.run(cfg)
    out = cfg.path("tokenizer")
    meta = read_meta(out)
    tok = load_tokenizer(out / "tokenizer.json")
    assert meta["vocab_size"] == tok.get_vocab_size() == report["vocab_size"]
    assert meta["eot_id"] == tok.token_to_id(EOT) == 0 and meta["dtype"] == "uint16"
    texts = {s: pq.read_table(p).column("text").to_pylist() for s, p in input_paths(cfg).items()}
    for split, entry in meta["splits"].items():
        assert read_header(out / entry["file"]) == (np.dtype("uint16"), entry["tokens"])
        tokens = load_split(out, split, verify=True)  # (N,) uint16
        assert entry["docs"] == len(texts[split]) > 0
        assert int((tokens == meta["eot_id"]).sum()) == entry["docs"]
        assert tokens[-1] == meta["eot_id"]
        assert entry["bytes"] == sum(len(t.encode()) for t in texts[split])
        # meta's `bytes` and the token->bytes table use one convention (separators: 0)
        assert text_bytes(tokens, token_byte_lengths(tok)) == entry["bytes"]
        assert report["splits"][split]["tokens"] == entry["tokens"]
    val = load_split(out, "val")
    first_end = int(np.argmax(val == meta["eot_id"]))
    assert decode(tok, val[:first_end]) == texts["val"][0]
    assert meta["bytes_per_token"]["val"] == pytest.approx(bytes_per_token(tok, texts["val"]))
    saved = json.loads((cfg.path("reports") / "tokenizer.json").read_text())
    assert saved == report and "seconds" not in json.dumps(saved)
    assert (out / "config.yaml").is_file()


def test_rerun_is_byte_identical_and_failure_keeps_outputs(synthesized, monkeypatch):
    cfg = synthesized
    stage.run(cfg)
    first = tree_md5(cfg.path("tokenizer"))
    report = (cfg.path("reports") / "tokenizer.json").read_bytes()
    stage.run(cfg)
    assert tree_md5(cfg.path("tokenizer")) == first
    assert (cfg.path("reports") / "tokenizer.json").read_bytes() == report

    def fail(*args, **kwargs):
        raise LmforgeError("boom while encoding")

    monkeypatch.setattr(encode, "encode_split", fail)
    with pytest.raises(LmforgeError, match="boom"):
        stage.run(cfg_for(cfg.root, "tokenizer.vocab_size=300"))
    assert tree_md5(cfg.path("tokenizer")) == first
    leftovers = [p.name for p in cfg.path("tokenizer").parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_missing_input_is_a_clear_error(project, monkeypatch, capsys):
    with pytest.raises(
        LmforgeError,
        match=r"pretrain_train\.parquet: train input not found; run `dvc repro synthesize`",
    ):
        stage.run(cfg_for(project))
    monkeypatch.chdir(project)
    assert stage.main([]) == 1
    assert "pretrain_train.parquet: train input not found" in capsys.readouterr().err
    assert not cfg_for(project).path("tokenizer").exists()
