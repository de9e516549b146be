"""Throughput and memory of the validate stage on a large generated corpus.

    .venv/bin/python benchmarks/validate_throughput.py --size-mb 1000

Generates a JSONL corpus of `--size-mb` MB (random-word documents of 200-4000 characters,
with a few planted duplicates, emails and phone numbers below the gate's thresholds), then
runs the validate stage on it in a child process and prints MB/s and the child's peak RSS.
Targets (issue 2): >= 20 MB/s on 2 cores, peak RSS < 2 GB, flat in the corpus size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> tuple[int, int]:
    """Write ~size_mb MB of JSONL; return (documents, bytes)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(20000)]
    docs = written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 1e6:
            words = rng.choice(vocab, size=(512, 120))  # 512 docs a batch
            lines = []
            for i, row in enumerate(words):
                text = " ".join(row[: rng.integers(30, 120)]).capitalize() + "."
                if i == 0 and docs % 51200 == 0:
                    text += " Write to someone@example.com or call 555-123-4567."
                lines.append(json.dumps({"text": text}))
            if docs % 25600 == 0:
                lines.append(lines[1])  # a planted duplicate
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block)
            docs += len(lines)
    return docs, written


def run_validate(root: Path) -> tuple[float, float, dict]:
    """Run the stage in a child process; return (seconds, child peak RSS in MB, summary)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.validate"],
        cwd=root,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"validate failed:\n{proc.stderr[-3000:]}")
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return seconds, rss_mb, json.loads(proc.stdout)


def main() -> None:
    from conftest import make_project

    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_project(
            Path(tmp) / "proj",
            preset=None,
            overrides=[
                "validate.sources=[{kind: jsonl, name: big, path: corpus.jsonl}]",
                "validate.chunk_rows=20000",
            ],
        )
        t0 = time.perf_counter()
        docs, size = make_corpus(root / "corpus.jsonl", args.size_mb)
        took = time.perf_counter() - t0
        print(f"corpus: {docs:,} docs, {size / 1e6:.0f} MB, generated in {took:.0f}s")
        seconds, rss_mb, summary = run_validate(root)
        print(f"validate: {seconds:.1f}s (incl. ~5s start-up and GX), kept {summary['docs']}")
        print(f"throughput: {size / 1e6 / seconds:.1f} MB/s   peak RSS: {rss_mb:.0f} MB")


if __name__ == "__main__":
    main()
