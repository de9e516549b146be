"""A decoder-only GPT language model (nanoGPT-style): the model that stacks the layers.

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

Files: `config.py` (GPTConfig, padded_vocab), `layers.py` (positional encodings, attention,
MLP, Block, and `KVCache`, the per-layer key/value store that lets
`GPT.forward(idx, cache=cache)` decode incrementally), this one (GPT, PRESETS, exact
parameter counts `num_params` / `analytic_num_params`; it re-exports the others' names).
The MFU formula lives in pipeline/train/mfu.py and the AdamW parameter grouping in
pipeline/train/optim.py. The module imports only torch and the
standard library, because the GPU benchmark machine has nothing else.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

from pipeline.model.config import ACTIVATIONS, POS_ENCODINGS, GPTConfig, padded_vocab
from pipeline.model.layers import (
    MLP,
    Block,
    CausalSelfAttention,
    KVCache,
    apply_rope,
    attention_reference,
    rope_tables,
    sinusoidal_table,
)

# Re-exported: callers import the model's public names from this module.
__all__ = [
    "ACTIVATIONS",
    "GPT",
    "MLP",
    "POS_ENCODINGS",
    "PRESETS",
    "Block",
    "CausalSelfAttention",
    "GPTConfig",
    "KVCache",
    "analytic_num_params",
    "apply_rope",
    "attention_reference",
    "padded_vocab",
    "rope_tables",
    "sinusoidal_table",
]

PRESETS: dict[str, GPTConfig] = {
    # ~1.05M parameters: trains on a CPU at several thousand tokens/s.
    "tiny": GPTConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=128),
    # GPT-2 small as in nanoGPT's bench.py: learned positions, GELU, bias=False, vocab padded
    # from 50257 to 50304; 123,587,328 parameters without position embeddings.
    "gpt2-124m": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
}


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
        """idx (B, T) token ids -> (logits (B, T, V), the mean loss when targets are given).

        Logits are float32 without targets; with targets they stay in the compute dtype
        (bf16 under autocast) and the loss is computed in float32.

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
        logits = self.lm_head(x)  # (B, T, V) in the compute dtype (bf16 under autocast)
        if targets is None:
            return logits.float(), None  # callers that score or sample get float32
        # Training keeps the logits in the compute dtype and upcasts inside the loss: no fp32
        # (B, T, V) copy is returned and held (3.3 GB at B=16, T=1024 for GPT-2), and under
        # torch.compile the upcast fuses into the cross-entropy kernel. In fp32 `.float()` is
        # the tensor itself, so CPU results are unchanged bit for bit.
        loss = F.cross_entropy(
            logits.view(B * T, -1).float(), targets.reshape(B * T), ignore_index=-1
        )
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
