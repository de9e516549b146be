"""Fine-tuning examples as token tensors: prompt, answer, end-of-text; loss on the answer only.

Each example becomes `prompt + answer + <|endoftext|>`; the labels are the next tokens with
the prompt positions set to -1 (ignored by the loss), so the model learns to produce the
answer and then stop. Sequences longer than the context keep their end (the question and
the answer) and drop the start of the story.

Batches, like pretraining's, are a pure function of (seed, step): every fine-tuning method
in a comparison sees the same data in the same order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.errors import LmforgeError
from pipeline.text.tokenizer import encode_docs

IGNORE = -1


@dataclass(frozen=True)
class TaskSet:
    """Tokenized examples: inputs and labels per example (answer positions labelled)."""

    inputs: list[list[int]]
    labels: list[list[int]]
    answers: list[str]

    def __len__(self) -> int:
        return len(self.inputs)


def read_examples(path: Path) -> list[dict[str, str]]:
    """The JSONL written by synthesize, with a clear error naming the file and line."""
    if not path.is_file():
        raise LmforgeError(f"{path}: fine-tuning set not found; run `dvc repro synthesize`")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            rows.append({"prompt": row["prompt"], "answer": row["answer"]})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            msg = f"{path}:{n}: expected a JSON object with prompt and answer ({e})"
            raise LmforgeError(msg) from None
    if not rows:
        raise LmforgeError(f"{path}: no examples")
    return rows


def tokenize(tok, rows: list[dict[str, str]], eot_id: int, block_size: int) -> TaskSet:
    """Encode prompt and answer separately, so the answer boundary is exact in tokens."""
    prompts = encode_docs(tok, [r["prompt"] for r in rows])
    answers = encode_docs(tok, [r["answer"] for r in rows])
    inputs, labels = [], []
    for p, a in zip(prompts, answers, strict=True):
        seq = p + a + [eot_id]
        target = [IGNORE] * (len(p) - 1) + a + [eot_id]  # target[i] is the token after seq[i]
        seq, target = seq[:-1][-block_size:], target[-block_size:]
        inputs.append(seq)
        labels.append(target)
    return TaskSet(inputs, labels, [r["answer"] for r in rows])


def collate(task: TaskSet, idx: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of shape (B, L), right-padded to the longest example; padding is ignored."""
    length = max(len(task.inputs[i]) for i in idx)
    x = torch.full((len(idx), length), pad_id, dtype=torch.long)
    y = torch.full((len(idx), length), IGNORE, dtype=torch.long)
    for row, i in enumerate(idx):
        n = len(task.inputs[i])
        x[row, :n] = torch.tensor(task.inputs[i])
        y[row, :n] = torch.tensor(task.labels[i])
    return x, y


def batch_indices(n: int, batch: int, seed: int, step: int) -> list[int]:
    """The examples of `step`: a seeded draw, the same for every method."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(n, size=min(batch, n), replace=False).tolist()


@torch.no_grad()
def evaluate_task(model, task: TaskSet, pad_id: int, batch: int, device) -> dict[str, float]:
    """Answer loss (nats/token) and exact-match accuracy of greedy decoding.

    Greedy decoding reproduces the reference answer (and then stops) exactly when, at every
    answer position, the reference token is the argmax given the reference prefix; so one
    teacher-forced forward pass gives greedy exact match without a decoding loop.
    """
    was_training = model.training
    model.eval()
    loss_sum, tokens, correct = 0.0, 0, 0
    for start in range(0, len(task), batch):
        idx = list(range(start, min(start + batch, len(task))))
        x, y = collate(task, idx, pad_id)
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)  # (B, L, V)
        mask = y != IGNORE
        nll = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), y.clamp(min=0), reduction="none"
        )  # (B, L)
        loss_sum += (nll * mask).sum().item()
        tokens += mask.sum().item()
        hit = (logits.argmax(-1) == y) | ~mask  # (B, L)
        correct += hit.all(dim=1).sum().item()
    model.train(was_training)
    return {
        "answer_loss": loss_sum / max(tokens, 1),
        "task_accuracy": correct / max(len(task), 1),
        "answer_tokens": tokens,  # the answers' tokens and each one's end of text
    }
