"""The GPT architecture as data: `GPTConfig` (validated on construction) and `padded_vocab`.

Kept apart from the modules (pipeline/model/layers.py, pipeline/model/gpt.py) so both can
import it; standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

POS_ENCODINGS = ("learned", "sinusoidal", "rotary")
ACTIVATIONS = ("gelu", "relu")


def padded_vocab(n: int, multiple: int = 64) -> int:
    """`n` rounded up to a multiple of `multiple`: matmuls over the vocabulary run faster."""
    if n < 1 or multiple < 1:
        raise ValueError(f"padded_vocab needs n >= 1 and multiple >= 1, got {n=}, {multiple=}")
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class GPTConfig:
    """The architecture. `vocab_size` is the model's (padded) vocabulary, not the tokenizer's."""

    vocab_size: int
    block_size: int  # T, the longest context
    n_layer: int
    n_head: int
    n_embd: int  # d, the model width
    dropout: float = 0.0
    bias: bool = False  # biases in Linear layers and LayerNorms
    pos_encoding: Literal["learned", "sinusoidal", "rotary"] = "learned"
    activation: Literal["gelu", "relu"] = "gelu"
    mlp_ratio: int = 4  # hidden width of the MLP is mlp_ratio * n_embd
    rope_base: float = 10000.0  # RoPE frequency base (rotary only)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be an integer >= 1, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be a bool, got {self.bias!r}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(
                f"GPTConfig.pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}"
            )
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
            )
        if self.pos_encoding == "rotary" and self.head_size % 2:
            raise ValueError(
                f"GPTConfig.n_embd/n_head (head size {self.head_size}) must be even for "
                "pos_encoding='rotary': RoPE rotates pairs of dimensions"
            )
        if self.pos_encoding == "sinusoidal" and self.n_embd % 2:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} must be even for pos_encoding='sinusoidal'"
            )
        if not self.rope_base > 0:
            raise ValueError(f"GPTConfig.rope_base must be > 0, got {self.rope_base!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_params(cls, model_params: Any, vocab_size: int, pad_multiple: int = 64) -> GPTConfig:
        """Build from `params.yaml`'s `model` section and the tokenizer's real vocabulary size.

        `model_params` is any object with n_layer, n_head, n_embd, block_size, dropout, bias,
        pos_encoding and activation (pipeline.config.ModelConfig, not imported here so this
        module stays torch-only). The vocabulary is padded to `pad_multiple` (1: no padding).
        """
        return cls(
            vocab_size=padded_vocab(vocab_size, pad_multiple),
            block_size=model_params.block_size,
            n_layer=model_params.n_layer,
            n_head=model_params.n_head,
            n_embd=model_params.n_embd,
            dropout=float(model_params.dropout),
            bias=model_params.bias,
            pos_encoding=model_params.pos_encoding,
            activation=model_params.activation,
        )
