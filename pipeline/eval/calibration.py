"""Calibration of next-token predictions: ECE, MCE, Brier score, entropy, reliability diagram.

Plain torch + stdlib (matplotlib is only tried inside ``reliability_png``), summed in
float64 so the numbers are bit-identical on re-runs on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

_CHUNK_FLOATS = 1 << 22  # rows per calibration chunk are sized to ~32 MiB of float64


class CalibrationAccumulator:
    """Streaming calibration statistics over next-token predictions; O(n_bins) memory.

    Feed it batches with ``update(logits, targets)`` (or ``update_probs``) and read the same
    numbers as ``calibration`` would give on the concatenated batches with ``result()``.
    Rows whose target equals ``ignore_index`` (padding) are skipped.

    Per prediction with top-1 confidence ``c = max_v p_v``, prediction ``argmax_v p_v`` and
    target y it adds ``c`` and ``1[argmax = y]`` to the equal-width bin of ``c`` (bin k is
    ``[k/n_bins, (k+1)/n_bins)``, the last one closed at 1), plus the Brier term
    ``sum_v (p_v - 1[v=y])^2 = sum_v p_v^2 - 2 p_y + 1``, the entropy ``-sum_v p_v ln p_v``
    and the loss ``-ln p_y``.
    """

    def __init__(self, n_bins: int = 15, ignore_index: int = -100) -> None:
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        self.n_bins, self.ignore_index = n_bins, ignore_index
        self.bin_count = torch.zeros(n_bins, dtype=torch.int64)  # (n_bins,)
        self.bin_conf = torch.zeros(n_bins, dtype=torch.float64)  # (n_bins,) sum of c
        self.bin_correct = torch.zeros(n_bins, dtype=torch.float64)  # (n_bins,) sum of hits
        self.brier_sum = self.entropy_sum = self.nll_sum = 0.0
        self.count = 0

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> CalibrationAccumulator:
        """Add (N, V) unnormalized logits and their (N,) integer targets."""
        return self._update(logits, targets, from_logits=True)

    def update_probs(self, probs: torch.Tensor, targets: torch.Tensor) -> CalibrationAccumulator:
        """Add (N, V) probability vectors (rows summing to 1) and their (N,) targets."""
        return self._update(probs, targets, from_logits=False)

    def _update(
        self, scores: torch.Tensor, targets: torch.Tensor, from_logits: bool
    ) -> CalibrationAccumulator:
        if scores.dim() != 2 or targets.dim() != 1 or scores.size(0) != targets.size(0):
            raise ValueError(
                f"calibration: expected (N, V) scores and (N,) targets, got "
                f"{tuple(scores.shape)} and {tuple(targets.shape)}"
            )
        scores, targets = scores.detach(), targets.detach().to(torch.int64)
        keep = targets != self.ignore_index  # (N,)
        if not bool(keep.all()):
            scores, targets = scores[keep], targets[keep]
        V = scores.size(1)
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= V):
            raise ValueError(f"calibration: targets must lie in [0, {V}) or be ignore_index")
        rows = max(1, _CHUNK_FLOATS // max(V, 1))
        for start in range(0, targets.numel(), rows):
            self._add_chunk(
                scores[start : start + rows], targets[start : start + rows], from_logits
            )
        return self

    def _add_chunk(self, scores: torch.Tensor, y: torch.Tensor, from_logits: bool) -> None:
        s = scores.to(torch.float64)  # (n, V)
        if from_logits:
            logp = torch.log_softmax(s, dim=-1)  # (n, V)
            p = logp.exp()
            plogp = p * logp  # (n, V)
        else:
            p = s
            plogp = torch.special.xlogy(p, p)  # (n, V), 0 log 0 = 0
        conf, pred = p.max(dim=-1)  # (n,), (n,)
        p_y = p.gather(1, y[:, None]).squeeze(1)  # (n,)
        hit = (pred == y).to(torch.float64)  # (n,)
        idx = (conf * self.n_bins).floor().to(torch.int64).clamp_(0, self.n_bins - 1)  # (n,)
        self.bin_count += torch.bincount(idx, minlength=self.n_bins)
        self.bin_conf.index_add_(0, idx, conf)
        self.bin_correct.index_add_(0, idx, hit)
        self.brier_sum += float(((p * p).sum(-1) - 2.0 * p_y + 1.0).sum())
        self.entropy_sum -= float(plogp.sum())
        self.nll_sum -= float(p_y.log().sum())
        self.count += y.numel()

    def result(self) -> dict[str, Any]:
        """ECE, MCE, Brier, entropy, accuracy, NLL and the reliability diagram.

        ``ece = sum_k (n_k / N) |acc_k - conf_k|`` over equal-width confidence bins: how
        far, on average over predictions, the stated confidence is from the hit rate. It
        is 0 for a calibrated model and is the headline number of Guo et al. (2017).
        ``mce`` is the largest per-bin gap. ``brier`` is the mean multiclass Brier score
        (a proper scoring rule, 0 for confident correct answers, at most 2).
        ``entropy`` is the mean predictive entropy in nats (ln V for a uniform model).
        ``diagram`` lists every bin as {lower, upper, count, confidence, accuracy}; the
        last two are None for empty bins.
        """
        if self.count == 0:
            raise ValueError("calibration: no predictions were added")
        N, diagram, ece, mce = self.count, [], 0.0, 0.0
        for k in range(self.n_bins):
            n_k = int(self.bin_count[k])
            conf = acc = None
            if n_k:
                conf = float(self.bin_conf[k]) / n_k
                acc = float(self.bin_correct[k]) / n_k
                ece += n_k / N * abs(acc - conf)
                mce = max(mce, abs(acc - conf))
            lower, upper = k / self.n_bins, (k + 1) / self.n_bins
            diagram.append(
                {"lower": lower, "upper": upper, "count": n_k, "confidence": conf, "accuracy": acc}
            )
        return {
            "ece": ece,
            "mce": mce,
            "brier": self.brier_sum / N,
            "entropy": self.entropy_sum / N,
            "accuracy": float(self.bin_correct.sum()) / N,
            "confidence": float(self.bin_conf.sum()) / N,
            "nll": self.nll_sum / N,
            "count": N,
            "diagram": diagram,
        }


def calibration(
    probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15, ignore_index: int = -100
) -> dict[str, Any]:
    """Calibration of (N, V) next-token probabilities against (N,) targets (one shot).

    See ``CalibrationAccumulator.result`` for the formulas; this is the accumulator fed
    once, so the streaming and one-shot numbers cannot disagree.
    """
    acc = CalibrationAccumulator(n_bins, ignore_index)
    return acc.update_probs(probs, targets).result()


def reliability_png(
    diagram: Sequence[dict[str, Any]], path: str | Path, title: str = "reliability diagram"
) -> Path | None:
    """Draw accuracy vs confidence per bin (with the diagonal) and the bin counts.

    Returns the written path, or None when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    lower = [b["lower"] for b in diagram]
    width = [b["upper"] - b["lower"] for b in diagram]
    acc = [b["accuracy"] or 0.0 for b in diagram]
    conf = [b["confidence"] if b["confidence"] is not None else math.nan for b in diagram]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(lower, acc, width=width, align="edge", edgecolor="black", label="accuracy")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    centers = [lo + w / 2 for lo, w in zip(lower, width, strict=True)]
    top.plot(centers, conf, "o", ms=3, color="tab:red", label="mean confidence")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(title)
    top.legend(loc="upper left")
    bottom.bar(lower, [b["count"] for b in diagram], width=width, align="edge", color="gray")
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("count")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
