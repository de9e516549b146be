"""Text in, text out: a trained GPT and its tokenizer behind one small, thread-safe object.

    lmforge generate --model models:/lmforge-gpt@champion "once upon a time"
    lmforge generate --model models/finetune --tokenizer data/tokenizer/tokenizer.json "tom"

The served MLflow model (pipeline/serve/pyfunc_model.py), `lmforge generate` and the register
stage's champion comparison all go through `TextGenerator`, so they decode the same way.

A *model package* is a folder holding `model_config.json`, `model.safetensors`,
`tokenizer.json` and the tokenizer's `meta.json` (plus, when registered, `config.yaml` and
`MODEL_CARD.md`). The register stage writes one; `TextGenerator.from_folder` reads one. The
end-of-text token, where generation stops, is the one meta.json names (`special_tokens[0]`,
`eot_id`: whatever `tokenizer.special_tokens` was), never a literal.

Why it is safe under concurrent requests: each prompt is decoded on its own (the result of
a prompt never depends on what else is in the request), sampling draws from a per-call
`torch.Generator`, and nothing mutable is shared between calls (the model stays in eval
mode; `torch.no_grad` is per thread).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from pipeline.config.decoding import DecodingError
from pipeline.config.decoding import shown as _shown
from pipeline.config.schema import DecodingConfig
from pipeline.core.errors import LmforgeError
from pipeline.core.names import MODEL_CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from pipeline.model.generate import generate
from pipeline.model.gpt import GPT
from pipeline.model.load import read_model_files
from pipeline.text.shards import META_FILE, read_meta
from pipeline.text.tokenizer import decode, encode_docs, end_of_text, load_tokenizer

# meta.json (the tokenizer stage's) names the end-of-text token; see `from_folder`.
PACKAGE_FILES = (MODEL_CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, META_FILE)
DEFAULTS_FILE = "generation_defaults.json"  # in a registered package: register.decoding


# Bounds of a generation request: the same rule for the served model, `lmforge generate` and
# params.yaml's register.decoding, because a request is a DecodingConfig (pipeline/config/
# schema.py: each field's spec bounds, checked by pipeline/config/decoding.py) plus
# `return_full_text`. What the bounds do not say:
# - max_new_tokens: at most the model's block_size (`check_for_model`). Prompt and
#   continuation share the context, and the prompt is cropped from the left to fit
#   (pipeline/model/generate.py), so the longest continuation is the whole context; a larger
#   value is refused, never quietly lowered.
# - num_beams applies to strategy beam only, as temperature, top_k and top_p apply to
#   strategy sample only (the cost of beam search grows with the width: at most 64);
#   no_repeat_ngram_size (>= 0, 0 = off) and repetition_penalty (in (0, 10], 1 = off) apply
#   to every strategy.
# - prompts: 1 .. MAX_PROMPTS strings of at most MAX_PROMPT_CHARS characters each. Each
#   prompt is decoded on its own, so a request costs prompts x max_new_tokens forward steps.
MAX_PROMPTS = 64
MAX_PROMPT_CHARS = 20_000
PROMPTS_FIELD = "inputs"  # the served model's request field that holds the prompts
# The decoding of a bare model folder (no generation_defaults.json): the values of
# params.yaml's register.decoding, whose copy a registered package carries.
FALLBACK_DEFAULTS: dict[str, Any] = {
    "strategy": "greedy",
    "max_new_tokens": 48,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "num_beams": 1,
    "seed": 0,
    "no_repeat_ngram_size": 0,
    "repetition_penalty": 1.0,
    "return_full_text": True,
}


class GenerationRequestError(LmforgeError, ValueError):
    """A generation request field with a bad value; `field` names it (e.g. "top_p")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is not a token count


def _check_int(name: str, value: Any, low: int, high: int, why: str = "") -> None:
    if not _is_int(value) or not low <= value <= high:
        raise GenerationRequestError(
            name, f"expected an integer in [{low}, {high}]{why}, got {_shown(value)}"
        )


def check_prompts(prompts: Any) -> list[str]:
    """The prompts of a request, checked against the bounds above; an error names the field."""
    if not isinstance(prompts, list | tuple) or not 1 <= len(prompts) <= MAX_PROMPTS:
        got = f"{len(prompts)} items" if isinstance(prompts, list | tuple) else _shown(prompts)
        raise GenerationRequestError(
            PROMPTS_FIELD, f"expected a list of 1 to {MAX_PROMPTS} prompt strings, got {got}"
        )
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise GenerationRequestError(
                f"{PROMPTS_FIELD}[{i}]", f"expected a string, got {_shown(prompt)}"
            )
        if len(prompt) > MAX_PROMPT_CHARS:
            raise GenerationRequestError(
                f"{PROMPTS_FIELD}[{i}]",
                f"a prompt has at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}",
            )
    return list(prompts)


@dataclass(frozen=True)
class GenerationParams(DecodingConfig):
    """Per-request decoding settings (the pyfunc's params; defaults from `register.decoding`).

    The decoding fields are DecodingConfig's (one definition, one check); a request adds only
    `return_full_text`. Every instance is checked on construction (types and bounds, except
    the model's own limit on max_new_tokens: `check_for_model`); an error names the field.
    """

    return_full_text: bool = True  # prompt + continuation (False: the continuation only)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except DecodingError as e:
            raise GenerationRequestError(e.field, e.message) from None
        if not isinstance(self.return_full_text, bool):
            raise GenerationRequestError(
                "return_full_text", f"expected true or false, got {_shown(self.return_full_text)}"
            )

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any] | None, base: GenerationParams | None = None
    ) -> GenerationParams:
        """`base` with the keys of `values` replaced; an unknown key is an error naming it."""
        base = base or cls(**FALLBACK_DEFAULTS)
        if values is not None and not isinstance(values, Mapping):
            raise GenerationRequestError("params", f"expected an object, got {_shown(values)}")
        values = dict(values or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known), key=str)
        if unknown:
            raise GenerationRequestError(
                str(unknown[0]),
                f"unknown generation parameter(s) {unknown}; expected some of {known}",
            )
        merged = {name: getattr(base, name) for name in known} | values
        return cls(**merged)

    def check_for_model(self, block_size: int) -> None:
        """The bound that depends on the model: the continuation must fit its context."""
        _check_int(
            "max_new_tokens",
            self.max_new_tokens,
            1,
            block_size,
            f" (this model's context, block_size={block_size})",
        )


class TextGenerator:
    """A GPT in eval mode plus its tokenizer: `complete(prompts)` and `bits_per_byte(texts)`."""

    def __init__(
        self, model: GPT, tokenizer: Any, eot_id: int, defaults: GenerationParams | None = None
    ):
        """`eot_id`: the end-of-text id (`pipeline.text.tokenizer.end_of_text`)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eot_id = eot_id
        block_size = model.config.block_size
        if defaults is None:  # the built-in defaults, with a continuation that fits the model
            n_new = min(FALLBACK_DEFAULTS["max_new_tokens"], block_size)
            defaults = GenerationParams(**{**FALLBACK_DEFAULTS, "max_new_tokens": n_new})
        try:  # given defaults that do not fit would fail every request: refuse them now
            defaults.check_for_model(block_size)
        except GenerationRequestError as e:
            raise LmforgeError(f"default generation parameters (register.decoding): {e}") from None
        self.defaults = defaults

    @classmethod
    def from_folder(
        cls,
        folder: Path,
        tokenizer_json: Path | None = None,
        defaults: GenerationParams | None = None,
    ) -> TextGenerator:
        """Load a model package (or a model folder plus a separate `tokenizer_json`).

        The end-of-text token comes from the meta.json beside the tokenizer file (in a
        package, or data/tokenizer/). A package registered before packages shipped meta.json
        has none: then it is the tokenizer's special token at id 0 (`end_of_text`).
        """
        folder = Path(folder)
        tok_path = Path(tokenizer_json) if tokenizer_json else folder / TOKENIZER_FILE
        if not tok_path.is_file():
            raise LmforgeError(
                f"{tok_path}: tokenizer not found; a model package holds {', '.join(PACKAGE_FILES)}"
                " (or pass --tokenizer data/tokenizer/tokenizer.json)"
            )
        gcfg, state = read_model_files(folder, hint="expected a model package folder")
        model = GPT(gcfg)
        model.load_state_dict(state)
        tokenizer = load_tokenizer(tok_path)
        meta_path = tok_path.parent / META_FILE
        meta = read_meta(meta_path.parent) if meta_path.is_file() else None
        _, eot_id = end_of_text(tokenizer, meta, str(meta_path if meta else tok_path))
        return cls(model, tokenizer, eot_id, defaults)

    def check_request(
        self, prompts: Any, params: Mapping[str, Any] | None = None
    ) -> tuple[list[str], GenerationParams]:
        """The checked prompts and settings of a request (GenerationRequestError otherwise)."""
        prompts = check_prompts(prompts)
        gp = GenerationParams.from_mapping(params, self.defaults)
        gp.check_for_model(self.model.config.block_size)
        return prompts, gp

    def complete(self, prompts: list[str], params: Mapping[str, Any] | None = None) -> list[str]:
        """One generated text per prompt (the prompt included unless return_full_text=False).

        A prompt longer than the context left by max_new_tokens keeps its last tokens (the
        left-crop of pipeline/model/generate.py): the model cannot see further back anyway.
        """
        prompts, gp = self.check_request(prompts, params)
        return self.complete_checked(prompts, gp)

    def complete_checked(self, prompts: list[str], gp: GenerationParams) -> list[str]:
        """`complete` for a request `check_request` already accepted."""
        out = []
        for prompt, ids in zip(prompts, encode_docs(self.tokenizer, prompts), strict=True):
            # gp is a DecodingConfig (return_full_text aside): generate takes it as it is.
            new = list(generate(self.model, [self.eot_id, *ids], gp, eos_id=self.eot_id))
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
