"""Text in, text out: a trained GPT and its tokenizer behind one small, thread-safe object.

    lmforge generate --model models:/lmforge-gpt@champion "once upon a time"
    lmforge generate --model models/finetune --tokenizer data/tokenizer/tokenizer.json "tom"

The served MLflow model (pipeline/pyfunc_model.py), `lmforge generate` and the register
stage's champion comparison all go through `TextGenerator`, so they decode the same way.

A *model package* is a folder holding `model_config.json`, `model.safetensors` and
`tokenizer.json` (plus, when registered, `config.yaml` and `MODEL_CARD.md`). The register
stage writes one; `TextGenerator.from_folder` reads one.

Why it is safe under concurrent requests: each prompt is decoded on its own (the result of
a prompt never depends on what else is in the request), sampling draws from a per-call
`torch.Generator`, and nothing mutable is shared between calls (the model stays in eval
mode; `torch.no_grad` is per thread).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from pipeline import checkpoint as ckpt
from pipeline.errors import LmforgeError
from pipeline.generate import DecodeConfig, generate
from pipeline.model import GPT
from pipeline.tokenizer import decode, encode_docs, load_tokenizer

EOT = "<|endoftext|>"
PACKAGE_FILES = ("model_config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class GenerationParams:
    """Per-request decoding settings (the pyfunc's params; defaults from `register.decoding`)."""

    strategy: str = "greedy"  # greedy | sample | beam
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    num_beams: int = 1
    seed: int = 0
    return_full_text: bool = True  # prompt + continuation (False: the continuation only)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, base: GenerationParams | None = None):
        """`base` with the keys of `values` replaced; an unknown key is an error naming it."""
        base = base or cls()
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LmforgeError(
                f"unknown generation parameter(s) {unknown}; expected some of {sorted(known)}"
            )
        merged = {f.name: getattr(base, f.name) for f in fields(cls)} | values
        return cls(**merged)

    def decode_config(self, eos_id: int) -> DecodeConfig:
        """The checked `DecodeConfig` (a bad value raises ValueError naming the key)."""
        return DecodeConfig(
            strategy=self.strategy,  # type: ignore[arg-type]
            max_new_tokens=int(self.max_new_tokens),
            temperature=float(self.temperature),
            top_k=int(self.top_k),
            top_p=float(self.top_p),
            num_beams=int(self.num_beams) if self.strategy == "beam" else 1,
            eos_id=eos_id,
            seed=int(self.seed),
        )


class TextGenerator:
    """A GPT in eval mode plus its tokenizer: `complete(prompts)` and `bits_per_byte(texts)`."""

    def __init__(self, model: GPT, tokenizer: Any, defaults: GenerationParams | None = None):
        eot = tokenizer.token_to_id(EOT)
        if eot is None:
            raise LmforgeError(f"the tokenizer has no {EOT!r} token; it separates documents")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eot_id: int = eot
        self.defaults = defaults or GenerationParams()

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        tokenizer_json: Path | None = None,
        defaults: GenerationParams | None = None,
    ) -> TextGenerator:
        """Load a model package (or a model folder plus a separate `tokenizer_json`)."""
        folder = Path(folder)
        tok_path = Path(tokenizer_json) if tokenizer_json else folder / "tokenizer.json"
        if not tok_path.is_file():
            raise LmforgeError(
                f"{tok_path}: tokenizer not found; a model package holds {', '.join(PACKAGE_FILES)}"
                " (or pass --tokenizer data/tokenizer/tokenizer.json)"
            )
        gcfg, state = ckpt.read_model_files(folder, hint="expected a model package folder")
        model = GPT(gcfg)
        model.load_state_dict(state)
        return cls(model, load_tokenizer(tok_path), defaults)

    def complete(self, prompts: list[str], params: Mapping[str, Any] | None = None) -> list[str]:
        """One generated text per prompt (the prompt included unless return_full_text=False)."""
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise LmforgeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        gp = GenerationParams.from_mapping(params, self.defaults)
        try:
            dcfg = gp.decode_config(self.eot_id)
        except ValueError as e:
            raise LmforgeError(f"bad generation parameters: {e}") from None
        # The continuation must leave room for the prompt: at most half the context.
        n_new = min(dcfg.max_new_tokens, max(1, self.model.config.block_size // 2))
        if n_new != dcfg.max_new_tokens:
            dcfg = dataclasses.replace(dcfg, max_new_tokens=n_new)
        out = []
        for prompt, ids in zip(prompts, encode_docs(self.tokenizer, prompts), strict=True):
            new = list(generate(self.model, [self.eot_id, *ids], dcfg))  # list in, list out
            if self.eot_id in new:
                new = new[: new.index(self.eot_id)]  # stop at the end of the document
            text = decode(self.tokenizer, new)
            out.append(prompt + text if gp.return_full_text else text)
        return out

    @torch.no_grad()
    def bits_per_byte(self, texts: list[str], batch: int = 16) -> float:
        """-log2 Q(texts) per UTF-8 byte, every token (document ends included) scored once.

        The documents are joined as `<eot> d1 <eot> d2 <eot> ...` and cut into consecutive
        windows of block_size predictions, like the test shard: a tokenizer-independent
        score, so two models with different tokenizers compare on the same texts.
        """
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        if n_bytes == 0:
            raise LmforgeError("bits_per_byte needs at least one non-empty text")
        stream = [self.eot_id]
        for ids in encode_docs(self.tokenizer, texts):
            stream += [*ids, self.eot_id]
        T = self.model.config.block_size
        starts = list(range(0, len(stream) - 1, T))
        total_nats = 0.0
        for i in range(0, len(starts), batch):
            group = starts[i : i + batch]
            x = torch.full((len(group), T), self.eot_id, dtype=torch.long)  # (B, T)
            y = torch.full((len(group), T), -1, dtype=torch.long)  # (B, T); -1 = padding
            for row, s in enumerate(group):
                chunk = torch.tensor(stream[s : s + T + 1])
                x[row, : len(chunk) - 1], y[row, : len(chunk) - 1] = chunk[:-1], chunk[1:]
            logits, _ = self.model(x)  # (B, T, V)
            nll = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-1, reduction="sum")
            total_nats += float(nll)
        return total_nats / math.log(2) / n_bytes
