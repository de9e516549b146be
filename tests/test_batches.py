"""The batch prefetch thread: its errors reach the training loop, and short shards fail early.

Each case runs in a subprocess with a timeout, because the failure being guarded against
is a hang (an exception lost in the producer thread leaves `queue.get()` waiting forever):
a hang shows up as `TimeoutExpired`, not as a stuck test session.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pipeline.text.shards import ShardWriter, read_shard
from pipeline.train.batches import BatchStream, ShardTooShort, sample_batch

# Generous: each case needs well under a second of work once torch is imported.
HANG_LIMIT_S = 120


def run_bounded(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; fail the test (not hang) if it does not return."""
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=HANG_LIMIT_S,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the batch stream hung (no result after {HANG_LIMIT_S} s): {e.stderr!r}")


def test_short_shard_fails_early_naming_the_shard_and_sizes(tmp_path):
    path = tmp_path / "train.bin"
    with ShardWriter(path, np.uint16) as writer:
        writer.write(np.arange(10, dtype=np.uint16))
    result = run_bounded(
        f"""
        import torch
        from pipeline.train.batches import BatchStream
        from pipeline.text.shards import read_shard
        tokens = read_shard({str(path)!r})
        try:
            stream = BatchStream(tokens, seed=0, batch=2, block=16, accum=1, rank=0, world=1,
                                 device=torch.device("cpu"))
            next(iter(stream.steps(0, 3)))
        except Exception as e:
            print(type(e).__name__, "|", e)
        else:
            print("no error")
        """
    )
    assert result.returncode == 0, result.stderr
    kind, message = result.stdout.strip().split(" | ", 1)
    assert kind == "ShardTooShort"
    # 10 tokens present; one window of block_size + 1 = 17 and a choice of start: 18.
    assert str(path) in message and "10 tokens" in message
    assert "block_size=16" in message and "at least 18" in message


def test_short_shard_error_in_process_has_the_name_given():
    tokens = np.arange(5, dtype=np.uint16)
    with pytest.raises(ShardTooShort, match=r"val split: has 5 tokens.*block_size=8.*at least 10"):
        BatchStream(
            tokens,
            seed=0,
            batch=1,
            block=8,
            accum=1,
            rank=0,
            world=1,
            device=torch.device("cpu"),
            name="val split",
        )


def test_shortest_accepted_shard_matches_what_sampling_needs(tmp_path):
    """The early check and `sample_batch` agree: block+2 tokens work, block+1 do not."""
    block = 8
    ok = np.arange(block + 2, dtype=np.uint16)
    x, y = sample_batch(ok, 0, 0, 0, 4, block)
    assert x.shape == y.shape == (4, block)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    with pytest.raises(ShardTooShort):
        sample_batch(ok[:-1], 0, 0, 0, 4, block)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_producer_thread_error_is_raised_in_the_consumer_with_its_cause(tmp_path):
    """A real error inside the prefetch thread: pinning memory without a CUDA device."""
    path = tmp_path / "train.bin"
    with ShardWriter(path, np.uint16) as writer:
        writer.write(np.arange(1000, dtype=np.uint16))
    assert len(read_shard(path)) == 1000
    result = run_bounded(
        f"""
        import threading, torch
        from pipeline.train.batches import BatchStream
        from pipeline.text.shards import read_shard
        stream = BatchStream(read_shard({str(path)!r}), seed=0, batch=2, block=16, accum=2,
                             rank=0, world=1, device=torch.device("cuda"))
        try:
            next(iter(stream.steps(0, 3)))
        except Exception as e:
            cause = e.__cause__
            print(type(e).__name__, "|", type(cause).__name__, "|", cause, "|", e)
        print("threads left:", threading.active_count())
        """
    )
    assert result.returncode == 0, result.stderr
    first, threads = result.stdout.strip().splitlines()
    kind, cause_kind, cause, message = first.split(" | ", 3)
    assert kind == "BatchPrefetchError" and cause_kind == "RuntimeError"
    assert cause in message  # the original message reaches the training loop
    assert "step 0" in message and str(path) in message
    assert threads == "threads left: 1"  # the producer has ended, not parked on the queue
