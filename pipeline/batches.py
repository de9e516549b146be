"""Training batches from memory-mapped token shards: seeded, stateless, prefetched.

A batch is a pure function of (seed, step, global micro-batch index): its random offsets
come from `np.random.default_rng([seed, step, index])`. So

- resuming at step s needs no loader state beyond s (the checkpoint's data position), and
  gives exactly the batches an uninterrupted run would have seen;
- with `world` processes and `accum` micro-steps, process r at micro-step m reads global
  index m * world + r, so 1 process x 2 micro-steps and 2 processes x 1 micro-step see the
  same global batch (the DDP/FSDP equivalence tests rely on this).

A background thread prepares the next batches while the model computes, and pins them on
CUDA so the host-to-device copy can overlap.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch


def sample_batch(
    tokens: np.ndarray, seed: int, step: int, index: int, batch: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (batch, block) int64, y shifted by one token; seeded by position."""
    if len(tokens) < block + 2:
        raise ValueError(f"shard has {len(tokens)} tokens; need more than block_size+1={block + 1}")
    rng = np.random.default_rng([seed, step, index])
    starts = rng.integers(0, len(tokens) - block - 1, size=batch)
    window = np.stack([tokens[s : s + block + 1] for s in starts]).astype(np.int64)  # (B, T+1)
    chunk = torch.from_numpy(window)
    return chunk[:, :-1], chunk[:, 1:]


class BatchStream:
    """Yields the micro-batches of steps `start..stop-1` for one process, prefetched."""

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
    ) -> None:
        self.tokens, self.seed, self.batch, self.block = tokens, seed, batch, block
        self.accum, self.rank, self.world, self.device = accum, rank, world, device
        self.prefetch = prefetch

    def indices(self, step: int) -> list[int]:
        """Global micro-batch indices this process reads at `step`."""
        return [m * self.world + self.rank for m in range(self.accum)]

    def _produce(self, start: int, stop: int, out: queue.Queue, halt: threading.Event) -> None:
        pin = self.device.type == "cuda"
        for step in range(start, stop):
            for index in self.indices(step):
                x, y = sample_batch(self.tokens, self.seed, step, index, self.batch, self.block)
                if pin:
                    x, y = x.pin_memory(), y.pin_memory()
                while not halt.is_set():
                    try:
                        out.put((x, y), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if halt.is_set():
                    return

    def steps(self, start: int, stop: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """For each step in [start, stop): its `accum` micro-batches, on the device."""
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        halt = threading.Event()
        worker = threading.Thread(target=self._produce, args=(start, stop, out, halt), daemon=True)
        worker.start()
        try:
            for _ in range(start, stop):
                micro = [out.get() for _ in range(self.accum)]
                yield [
                    (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                    for x, y in micro
                ]
        finally:
            halt.set()
            worker.join(timeout=5)


def eval_batches(
    tokens: np.ndarray, seed: int, n: int, batch: int, block: int, rank: int, world: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same `n` validation batches at every evaluation (pass a seed of their own)."""
    for i in range(rank, n, world):
        yield sample_batch(tokens, seed, 0, i, batch, block)
