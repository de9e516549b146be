"""The layers of the GPT: positional encodings, causal self-attention, the MLP and the block.

    Block(x) = x + attn(ln_1(x)) ; then  + mlp(ln_2(x))          (pre-LayerNorm, x: (B, T, C))

Attention is multi-head causal self-attention, softmax(QKᵀ/√d_k + causal mask)·V, computed by
`F.scaled_dot_product_attention(is_causal=True)` (flash / memory-efficient kernels on GPU);
`attention_reference` is the same formula written out in plain torch, and
`CausalSelfAttention.use_sdpa = False` routes a layer through it so tests can check the fused
path against the maths. `KVCache` is the per-layer key/value store for incremental decoding.
The model that stacks these is pipeline/model/gpt.py. Imports only torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

from pipeline.model.config import GPTConfig

# (cos, sin) of the rotary angles, each (T, hs/2): what `rope_tables` returns
Rope = tuple[Tensor, Tensor]

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


def rope_tables(block_size: int, head_size: int, base: float = 10000.0) -> Rope:
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

    def forward(self, x: Tensor, rope: Rope | None, cache: KVCache | None, layer: int) -> Tensor:
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

    def forward(self, x: Tensor, rope: Rope | None, cache: KVCache | None, layer: int) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x
