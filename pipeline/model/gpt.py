"""A decoder-only GPT language model in one readable file (nanoGPT-style).

    tokens (B, T) -> token embedding (+ learned or sinusoidal positions) -> dropout
      -> n_layer x [ x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)) ]      (pre-LayerNorm)
      -> ln_f -> lm_head (tied to the token embedding) -> logits (B, T, V)

Attention is multi-head causal self-attention, softmax(QKᵀ/√d_k + causal mask)·V, computed by
`F.scaled_dot_product_attention(is_causal=True)` (flash / memory-efficient kernels on GPU);
`attention_reference` is the same formula written out in plain torch, and
`CausalSelfAttention.use_sdpa = False` (or `GPT.set_use_sdpa(False)`) routes a model through
it so tests can check the fused path against the maths. With rotary positions (RoPE), q and k
are rotated inside attention and nothing is added to the embeddings.

Choices worth stating:
- GELU is the tanh approximation, as in the original GPT-2 (and HF's `gelu_new`).
- Biases are off by default (`bias=False`), also in the `gpt2-124m` preset: slightly faster,
  no worse (nanoGPT's finding); LayerNorms then have a gain but no bias.
- The vocabulary is padded to a multiple of 64 (`padded_vocab`) for efficient matmuls; ids at or
  above the tokenizer's real size are never targets, so training pushes their logits down.
  Evaluation code that wants exact probabilities over the real vocabulary slices the logits.

Also here: exact parameter counts (`num_params` / `analytic_num_params`) and `KVCache`, the
per-layer key/value store that lets `GPT.forward(idx, cache=cache)` decode incrementally
(pipeline/model/generate.py uses it). The MFU formula lives in pipeline/train/mfu.py and the
AdamW parameter grouping in pipeline/train/optim.py. The module imports only torch and the
standard library, because the GPU benchmark machine has nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

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


PRESETS: dict[str, GPTConfig] = {
    # ~1.05M parameters: trains on a CPU at several thousand tokens/s.
    "tiny": GPTConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=128),
    # GPT-2 small as in nanoGPT's bench.py: learned positions, GELU, bias=False, vocab padded
    # from 50257 to 50304; 123,587,328 parameters without position embeddings.
    "gpt2-124m": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}


# --------------------------------------------------------------------------------------
# Positional encodings
# --------------------------------------------------------------------------------------


def sinusoidal_table(block_size: int, n_embd: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(block_size, dtype=torch.float64).unsqueeze(1)  # (T, 1)
    two_i = torch.arange(0, n_embd, 2, dtype=torch.float64)  # (d/2,)
    angle = pos / (10000.0 ** (two_i / n_embd))  # (T, d/2)
    pe = torch.zeros(block_size, n_embd, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe.float()  # computed in float64 so large positions stay accurate


def rope_tables(block_size: int, head_size: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the RoPE angles pos·θ_i with θ_i = base^(-2i/hs), each (T, hs/2)."""
    theta = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (hs/2,)
    angle = torch.arange(block_size, dtype=torch.float64).unsqueeze(1) * theta  # (T, hs/2)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_j, x_{j+hs/2}) of x (B, nh, T, hs) by the angles in cos/sin (T, hs/2).

    A rotation by pos·θ makes q·k depend only on the relative offset of the two positions.
    """
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, nh, T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # keep bf16 under autocast: SDPA needs one dtype
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hs)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


def attention_reference(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """softmax(QKᵀ/√d_k + causal mask)·V written out; q, k, v and the result are (B, nh, T, hs).

    The slow, obviously-correct twin of the SDPA path, used by tests and by `use_sdpa=False`.
    With a KV cache k and v are longer (Tk = T_past + T): the T queries are the last T
    positions, so query i sees keys j <= i + T_past.
    """
    T, hs, Tk = q.size(-2), q.size(-1), k.size(-2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, Tk)
    causal = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)  # j <= i + T_past
    att = att.masked_fill(~causal, float("-inf"))
    att = F.softmax(att, dim=-1)
    att = F.dropout(att, p=dropout_p, training=dropout_p > 0)
    return att @ v  # (B, nh, T, hs)


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding.

    `k[layer]` and `v[layer]` are preallocated (B, nh, T_max, hs) buffers; positions
    [0, length) are filled. `GPT.forward(idx, cache=cache)` treats idx as positions
    [length, length + T), writes their keys/values and advances `length`, so each decoding step
    costs one token's work instead of a full forward over the context. Preallocation avoids a
    torch.cat (a copy of the whole cache) per step. Beam search reorders or expands the batch
    with `reorder`.
    """

    k: list[Tensor]  # n_layer x (B, nh, T_max, hs)
    v: list[Tensor]  # n_layer x (B, nh, T_max, hs)
    length: int = 0  # positions already cached

    @classmethod
    def empty(
        cls,
        cfg: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """Zeroed buffers for `batch_size` sequences of up to `max_len` (default block_size)."""
        max_len = cfg.block_size if max_len is None else max_len
        if not 1 <= max_len <= cfg.block_size:
            raise ValueError(
                f"KVCache max_len must be in [1, block_size={cfg.block_size}], got {max_len}"
            )
        shape = (batch_size, cfg.n_head, max_len, cfg.head_size)  # (B, nh, T_max, hs)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        return cls(k, v, 0)

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B_new,) in that order: beam search's parent pointers.

        `index` may repeat rows and have any length, so it also expands a batch-1 prompt cache
        to B_new beams (index = zeros(B_new)).
        """
        index = index.to(self.k[0].device)
        self.k = [t.index_select(0, index) for t in self.k]  # (B_new, nh, T_max, hs)
        self.v = [t.index_select(0, index) for t in self.v]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nh, T, hs) at [length, length + T); return keys/values [0, length + T).

        `length` itself is advanced by GPT.forward once every layer has written.
        """
        t0, t1 = self.length, self.length + k.size(2)
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]  # (B, nh, t1, hs) each


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused qkv projection.

    With a `KVCache` the T new queries attend to the T_past cached keys and causally among
    themselves; without one (training) it is plain causal attention over x.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.is_residual_proj = True  # GPT-2 init scales it by 1/sqrt(2·n_layer)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout
        self.use_sdpa = True  # False: the explicit formula in attention_reference

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        B, T, C = x.size()  # batch, sequence length, n_embd
        pos0 = 0 if cache is None else cache.length  # T_past: positions already cached
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # (B, T, C) each
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:
            cos, sin = rope[0][pos0 : pos0 + T], rope[1][pos0 : pos0 + T]  # (T, hs/2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, T_past + T, hs) each
            k, v = k.to(q.dtype), v.to(q.dtype)  # SDPA needs one dtype (cache may be fp32)
        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa and pos0 > 0 and T > 1:
            # SDPA's is_causal aligns the mask top-left, wrong when Tk > T: pass it explicitly.
            mask = torch.ones(T, pos0 + T, dtype=torch.bool, device=x.device).tril(pos0)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        elif self.use_sdpa:  # T_past == 0: causal; T == 1 after a prefix: sees every key
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=pos0 == 0)
        else:
            y = attention_reference(q, k, v, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear d→ratio·d, GELU (tanh) or ReLU, Linear ratio·d→d."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = cfg.mlp_ratio * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.act = nn.GELU(approximate="tanh") if cfg.activation == "gelu" else nn.ReLU()
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.c_proj.is_residual_proj = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: the residual stream is never normalised in place."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


class GPT(nn.Module):
    """Decoder-only transformer: forward(idx, targets) -> (logits, mean cross-entropy | None)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = (
            nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_encoding == "learned" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one (V, d) matrix, counted once
        # Fixed tables are buffers, not parameters, and not saved: they are rebuilt from cfg.
        if cfg.pos_encoding == "sinusoidal":
            self.register_buffer(
                "pos_table", torch.empty(cfg.block_size, cfg.n_embd), persistent=False
            )
        if cfg.pos_encoding == "rotary":
            half = cfg.head_size // 2
            self.register_buffer("rope_cos", torch.empty(cfg.block_size, half), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.block_size, half), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, residual projections ×1/sqrt(2·n_layer), zero biases.

        Public so a model built on the meta device (FSDP2) can be initialised after `to_empty`;
        it also rebuilds the fixed positional tables, which `to_empty` leaves uninitialised.
        """
        cfg = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                std = 0.02
                if getattr(module, "is_residual_proj", False):
                    std = 0.02 / math.sqrt(2 * cfg.n_layer)  # each block adds two such terms
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if cfg.pos_encoding == "sinusoidal":
            self.pos_table.copy_(sinusoidal_table(cfg.block_size, cfg.n_embd))
        if cfg.pos_encoding == "rotary":
            cos, sin = rope_tables(cfg.block_size, cfg.head_size, cfg.rope_base)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def set_use_sdpa(self, enabled: bool) -> None:
        """Route every attention layer through SDPA (True) or `attention_reference` (False)."""
        for module in self.modules():
            if isinstance(module, CausalSelfAttention):
                module.use_sdpa = enabled

    def num_params(self, exclude_position: bool = True) -> int:
        """Parameter count, the tied head counted once; learned positions left out if asked.

        Excluding position embeddings gives the N of the MFU formula (they cost no matmul).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared one once
        if exclude_position and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) float32, and the loss when targets given.

        `targets` (B, T) are already shifted by the caller (targets[:, t] = idx[:, t + 1]);
        positions with target -1 are ignored in the mean. With a `cache` (decoding), idx holds
        positions [cache.length, cache.length + T): they attend to the cached keys too, and
        the cache is advanced by T. The total length must fit block_size (callers crop).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        B, T = idx.size()
        cfg = self.config
        pos0 = 0 if cache is None else cache.length  # position of idx[:, 0]
        if pos0 + T > cfg.block_size:
            raise ValueError(
                f"sequence length T={T}"
                + (f" after {pos0} cached positions" if cache is not None else "")
                + f" exceeds the model's block_size={cfg.block_size}"
            )
        if cache is not None and (cache.batch_size != B or pos0 + T > cache.max_len):
            raise ValueError(
                f"KVCache holds batch {cache.batch_size} x {cache.max_len} positions; "
                f"cannot add idx of shape {tuple(idx.shape)} after {pos0} cached positions"
            )
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(pos0, pos0 + T, device=idx.device))  # (T, C) over B
        elif cfg.pos_encoding == "sinusoidal":
            x = x + self.pos_table[pos0 : pos0 + T]  # (T, C)
        rope = (self.rope_cos, self.rope_sin) if cfg.pos_encoding == "rotary" else None
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)  # (B, T, C)
        if cache is not None:
            cache.length = pos0 + T
        x = self.ln_f(x)
        logits = self.lm_head(x).float()  # (B, T, V); float32 even under bf16 autocast
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss


def analytic_num_params(cfg: GPTConfig, exclude_position: bool = True) -> int:
    """The parameter count from the architecture alone; equals `GPT(cfg).num_params()`."""
    d, L, r = cfg.n_embd, cfg.n_layer, cfg.mlp_ratio
    ln = d * (2 if cfg.bias else 1)  # gain, plus a bias when bias=True
    b = 1 if cfg.bias else 0
    attn = 3 * d * d + b * 3 * d + d * d + b * d  # fused qkv + output projection
    mlp = r * d * d + b * r * d + r * d * d + b * d  # d -> r·d -> d
    n = cfg.vocab_size * d + L * (2 * ln + attn + mlp) + ln  # tied embedding, blocks, ln_f
    if cfg.pos_encoding == "learned" and not exclude_position:
        n += cfg.block_size * d
    return n
