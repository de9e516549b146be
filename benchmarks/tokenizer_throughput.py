"""Throughput and memory of the tokenizer stage's encode path on a large generated corpus.

    .venv/bin/python benchmarks/tokenizer_throughput.py --size-mb 200

Generates a `--size-mb` MB parquet corpus (documents stitched from story-world stories and
Zipf-distributed random words), trains a BPE on its first `--train-mb` MB, then encodes the
whole corpus in a child process with the stage's own function
(`pipeline.text.encode.encode_split`: parquet record batches -> `encode_batch` ->
`ShardWriter`), and prints MB/s and that child's peak RSS. A second child runs the bare
baseline (read the same record batches and call `encode_batch`, discarding the ids) so the
stage's overhead shows as a ratio on the same machine. Memory must be flat in the corpus
size: one batch of documents at a time.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS_PER_GROUP = 5_000


def story_pool(n: int, seed: int) -> list[str]:
    """`n` story-world stories (~200 bytes each): natural-ish, repetitive English."""
    from pipeline.config import load_config
    from pipeline.data.ingest import storyworld_spec
    from pipeline.data.storyworld import StoryWorld

    # The grammar that the repo's params.yaml configures: the text the pipeline tokenizes.
    world, rng = StoryWorld(storyworld_spec(load_config(REPO))), random.Random(seed)
    return [world.sample(rng).text for _ in range(n)]


def word_vocab(rng: np.random.Generator, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Random lowercase words and Zipf(1.1) probabilities: a long tail, like real text."""
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, rng.integers(1, 10))) for _ in range(n)])
    p = 1.0 / np.arange(1, n + 1) ** 1.1
    return words, p / p.sum()


def make_docs(rng: np.random.Generator, pool: list[str], vocab, n: int) -> list[str]:
    """`n` documents: 70% stitched from 1-8 stories, 30% of 30-300 Zipf words."""
    words, p = vocab
    docs = []
    for _ in range(n):
        if rng.random() < 0.7:
            docs.append(" ".join(pool[i] for i in rng.integers(0, len(pool), rng.integers(1, 9))))
        else:
            docs.append(" ".join(rng.choice(words, rng.integers(30, 300), p=p)).capitalize() + ".")
    return docs


def make_corpus(path: Path, size_mb: float, seed: int = 0) -> tuple[int, int]:
    """Write ~size_mb MB of text as parquet (column `text`); return (documents, bytes)."""
    rng = np.random.default_rng(seed)
    pool, vocab = story_pool(20_000, seed), word_vocab(rng)
    schema = pa.schema([("text", pa.string())])
    docs = size = 0
    with pq.ParquetWriter(path, schema) as writer:
        while size < size_mb * 1e6:
            batch = make_docs(rng, pool, vocab, ROWS_PER_GROUP)
            writer.write_table(pa.table({"text": batch}, schema=schema))
            docs += len(batch)
            size += sum(len(d.encode("utf-8")) for d in batch)
    return docs, size


def train_on_prefix(corpus: Path, out: Path, train_mb: float, vocab_size: int) -> float:
    """Train a BPE on the corpus's first `train_mb` MB (the stage's reader); return seconds."""
    from pipeline.data.texts import ParquetTexts
    from pipeline.text.encode import iter_texts
    from pipeline.text.tokenizer import EOT, train_bpe

    budget = [train_mb * 1e6]

    def prefix():
        for text in iter_texts(ParquetTexts(corpus), 1000, "benchmark"):
            budget[0] -= len(text.encode("utf-8"))
            if budget[0] < 0:
                return
            yield text

    t0 = time.perf_counter()
    tok = train_bpe(prefix(), vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2)
    out.write_text(tok.to_str())
    return time.perf_counter() - t0


def child(mode: str, corpus: Path, tok_path: Path, shard: Path, batch_docs: int) -> None:
    """Run one encode pass in this (child) process and print its figures as JSON."""
    from pipeline.data.texts import ParquetTexts, iter_text_batches
    from pipeline.text.encode import encode_split
    from pipeline.text.tokenizer import encode_docs, load_tokenizer

    tok = load_tokenizer(tok_path)
    t0 = time.perf_counter()
    if mode == "stage":
        stats = encode_split(
            tok, ParquetTexts(corpus), shard, eot_id=0, batch_docs=batch_docs, label="bench"
        )
        tokens, n_bytes = stats.tokens, stats.bytes
    else:  # bare: the same batches through encode_batch, ids discarded
        tokens = n_bytes = 0
        for texts, size in iter_text_batches(corpus, batch_docs):
            tokens += sum(map(len, encode_docs(tok, texts)))
            n_bytes += size
    seconds = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "tokens": tokens, "bytes": n_bytes}))


def run_child(mode: str, corpus: Path, tok_path: Path, shard: Path, batch_docs: int) -> dict:
    args = [str(corpus), str(tok_path), str(shard), str(batch_docs)]
    cmd = [sys.executable, __file__, "--child", mode, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=200, help="corpus size in MB")
    parser.add_argument("--train-mb", type=float, default=20, help="BPE training sample in MB")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-docs", type=int, default=1000, help="encode_batch_docs")
    parser.add_argument("--child", nargs=5, metavar=("MODE", "CORPUS", "TOK", "SHARD", "BATCH"))
    args = parser.parse_args()
    if args.child:
        mode, corpus, tok, shard, batch = args.child
        child(mode, Path(corpus), Path(tok), Path(shard), int(batch))
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus, tok_path, shard = (Path(tmp) / n for n in ("corpus.parquet", "tok.json", "t.bin"))
        t0 = time.perf_counter()
        docs, size = make_corpus(corpus, args.size_mb)
        mb = size / 1e6
        print(f"corpus: {docs:,} docs, {mb:.0f} MB, generated in {time.perf_counter() - t0:.0f}s")
        secs = train_on_prefix(corpus, tok_path, args.train_mb, args.vocab_size)
        print(f"BPE: vocab {args.vocab_size} on the first {args.train_mb:.0f} MB in {secs:.1f}s")
        bare = run_child("bare", corpus, tok_path, shard, args.batch_docs)
        stage = run_child("stage", corpus, tok_path, shard, args.batch_docs)
        for name, r in (("bare encode_batch", bare), ("stage encode_split", stage)):
            print(
                f"{name:>18}: {r['seconds']:6.1f}s  {mb / r['seconds']:6.2f} MB/s  "
                f"{r['tokens'] / r['seconds'] / 1e6:5.2f} M tokens/s  peak RSS {r['rss_mb']:.0f} MB"
            )
        print(f"stage / bare throughput: {bare['seconds'] / stage['seconds']:.2f}")
        print(f"bytes per token: {stage['bytes'] / (stage['tokens'] - docs):.2f}")


if __name__ == "__main__":
    main()
