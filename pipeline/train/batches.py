"""Training batches from memory-mapped token shards: seeded, stateless, prefetched.

A batch is a pure function of (seed, step, global micro-batch index): its random offsets
come from `np.random.default_rng([seed, step, index])`. So

- resuming at step s needs no loader state beyond s (the checkpoint's data position), and
  gives exactly the batches an uninterrupted run would have seen;
- with `world` processes and `accum` micro-steps, process r at micro-step m reads global
  index m * world + r, so 1 process x 2 micro-steps and 2 processes x 1 micro-step see the
  same global batch (the DDP/FSDP equivalence tests rely on this).

A background thread prepares the next batches while the model computes, as one contiguous
(B, T+1) window each, pinned on CUDA so the host-to-device copy can overlap; x and y are
sliced from the window on the device. An error in that thread is handed to the
training loop through the queue and raised there (chained to the original), so it can
never leave the loop waiting forever on a queue nobody fills.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.errors import LmforgeError


class ShardTooShort(LmforgeError, ValueError):
    """A token shard cannot hold one training window of block_size + 1 tokens."""


class BatchPrefetchError(RuntimeError):
    """The prefetch thread failed; the original exception is its `__cause__`."""


def min_tokens(block: int) -> int:
    """Smallest shard `sample_batch` can draw from: one (block+1)-token window, 2 starts.

    The start is drawn from [0, len - block - 1), which must not be empty.
    """
    return block + 2


def _describe(tokens: np.ndarray, name: str | None) -> str:
    """A name for the shard in messages: the given name, else the memmap's file."""
    return name or getattr(tokens, "filename", None) or "token shard"


def check_shard(tokens: np.ndarray, block: int, name: str | None = None) -> None:
    """Raise ShardTooShort naming the shard, its token count and what block_size needs."""
    need = min_tokens(block)
    if len(tokens) < need:
        raise ShardTooShort(
            f"{_describe(tokens, name)}: has {len(tokens)} tokens, but model.block_size="
            f"{block} needs at least {need} (block_size + 2). Give this split more text, "
            "or lower model.block_size."
        )


def sample_window(
    tokens: np.ndarray, seed: int, step: int, index: int, batch: int, block: int
) -> torch.Tensor:
    """One contiguous (batch, block + 1) int64 tensor of token windows; seeded by position."""
    check_shard(tokens, block)
    rng = np.random.default_rng([seed, step, index])
    starts = rng.integers(0, len(tokens) - block - 1, size=batch)
    window = np.stack([tokens[s : s + block + 1] for s in starts]).astype(np.int64)  # (B, T+1)
    return torch.from_numpy(window)


def split_window(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), each (B, T), views of a (B, T+1) window: y is x shifted by one token."""
    return window[:, :-1], window[:, 1:]


def sample_batch(
    tokens: np.ndarray, seed: int, step: int, index: int, batch: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (batch, block) int64, y shifted by one token; seeded by position."""
    return split_window(sample_window(tokens, seed, step, index, batch, block))


@dataclass(frozen=True)
class _Failed:
    """Queue item: the producer stopped with `error` while preparing `step`."""

    step: int
    error: BaseException


class BatchStream:
    """Yields the micro-batches of steps `start..stop-1` for one process, prefetched.

    The shard is checked here, so a shard shorter than one window fails before training
    starts, with a message naming it (`name`, else the memmap's file).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seed: int,
        batch: int,
        block: int,
        accum: int,
        rank: int,
        world: int,
        device: torch.device,
        prefetch: int = 4,
        name: str | None = None,
        pin: bool | None = None,
    ) -> None:
        check_shard(tokens, block, name)
        # Page-locked host buffers make the copy to a GPU asynchronous; None: on CUDA only
        # (pinning needs a CUDA runtime, and a CPU run gains nothing from it).
        self.pin = device.type == "cuda" if pin is None else pin
        self.tokens, self.seed, self.batch, self.block = tokens, seed, batch, block
        self.accum, self.rank, self.world, self.device = accum, rank, world, device
        self.prefetch, self.name = prefetch, _describe(tokens, name)

    def indices(self, step: int) -> list[int]:
        """Global micro-batch indices this process reads at `step`."""
        return [m * self.world + self.rank for m in range(self.accum)]

    @staticmethod
    def _put(out: queue.Queue, item: object, halt: threading.Event) -> bool:
        """Put `item`, giving up when the consumer has gone (halt set); whether it went in."""
        while not halt.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, start: int, stop: int, out: queue.Queue, halt: threading.Event) -> None:
        """Queue one contiguous (B, T+1) window per micro-batch, pinned when `self.pin`.

        x and y are sliced from the window after the copy to the device: slices of it are
        not contiguous, and pinning each would copy it (twice the host traffic) into
        buffers the copy to the device cannot overlap with.
        """
        step = start
        try:
            for step in range(start, stop):
                for index in self.indices(step):
                    w = sample_window(self.tokens, self.seed, step, index, self.batch, self.block)
                    if self.pin:
                        w = w.pin_memory()  # (B, T+1), one page-locked buffer
                    if not self._put(out, w, halt):
                        return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(out, _Failed(step, e), halt)

    def _get(self, out: queue.Queue, worker: threading.Thread) -> torch.Tensor:
        """The next item; raises the producer's error in this (the training) thread."""
        while True:
            try:
                item = out.get(timeout=0.5)
                break
            except queue.Empty:
                # The producer always reports its end through the queue; a dead thread with
                # an empty queue is a bug, reported rather than waited on forever.
                if not worker.is_alive() and out.empty():
                    raise BatchPrefetchError(
                        f"batch prefetch thread for {self.name} ended without a batch"
                    ) from None
        if isinstance(item, _Failed):
            raise BatchPrefetchError(
                f"batch prefetch thread failed at step {item.step} reading {self.name}: "
                f"{type(item.error).__name__}: {item.error}"
            ) from item.error
        return item

    def steps(self, start: int, stop: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """For each step in [start, stop): its `accum` micro-batches, on the device."""
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        halt = threading.Event()
        worker = threading.Thread(target=self._produce, args=(start, stop, out, halt), daemon=True)
        worker.start()
        try:
            for _ in range(start, stop):
                micro = [self._get(out, worker) for _ in range(self.accum)]  # (B, T+1) each
                yield [split_window(w.to(self.device, non_blocking=True)) for w in micro]
        finally:
            halt.set()
            worker.join(timeout=5)


def eval_batches(
    tokens: np.ndarray, seed: int, n: int, batch: int, block: int, rank: int, world: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same `n` validation batches at every evaluation (pass a seed of their own)."""
    for i in range(rank, n, world):
        yield sample_batch(tokens, seed, 0, i, batch, block)
