"""Model tests: the attention maths, positional encodings, causality, parameter counts, the
optimizer grouping, FLOPs/MFU, config validation, and that a tiny model can learn at all."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

from pipeline.model.gpt import (
    GPT,
    PRESETS,
    GPTConfig,
    analytic_num_params,
    apply_rope,
    attention_reference,
    padded_vocab,
    rope_tables,
    sinusoidal_table,
)
from pipeline.train.mfu import PEAK_FLOPS, flops_per_token, mfu, peak_flops, peak_flops_for_name
from pipeline.train.optim import configure_optimizer

POS = ["learned", "sinusoidal", "rotary"]

# GPT-2 small at vocab 50304, bias=False, without the 1024x768 position table:
#   wte 50304*768 = 38,633,472
#   12 blocks x (qkv 3*768² + proj 768² + mlp 2*4*768² + 2 LayerNorm gains 2*768) = 84,953,088
#   ln_f 768                                                     -> 123,587,328 (~123.6M)
# with the learned positions (+786,432): 124,373,760.
GPT2_124M_PARAMS = 123_587_328


def small_cfg(pos: str = "learned", **kw) -> GPTConfig:
    base = dict(vocab_size=96, block_size=16, n_layer=2, n_head=4, n_embd=32, pos_encoding=pos)
    return GPTConfig(**{**base, **kw})


def make_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


# --------------------------------------------------------------------------------------
# Attention: SDPA against the explicit formula
# --------------------------------------------------------------------------------------


def test_attention_reference_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8) for _ in range(3))  # (B, nh, T, hs)
    ref = attention_reference(q, k, v)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(sdpa, ref, atol=1e-5, rtol=0)
    # The mask matters: without it the outputs differ, so the comparison above has teeth.
    assert not torch.allclose(F.scaled_dot_product_attention(q, k, v), ref, atol=1e-3)


def test_attention_reference_is_the_formula_row_by_row():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 5, 4, dtype=torch.float64) for _ in range(3))
    out = attention_reference(q, k, v)[0, 0]  # (T, hs)
    for i in range(5):  # query i attends to keys 0..i only
        scores = torch.tensor([float(q[0, 0, i] @ k[0, 0, j]) / 2.0 for j in range(i + 1)])
        weights = torch.softmax(scores.double(), dim=0)
        expected = (weights[:, None] * v[0, 0, : i + 1]).sum(0)
        torch.testing.assert_close(out[i], expected)


@pytest.mark.parametrize("pos", POS)
def test_model_sdpa_path_equals_reference_path(pos):
    model = make_model(small_cfg(pos))
    idx = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(1))
    logits_sdpa, loss_sdpa = model(idx, targets)
    model.set_use_sdpa(False)
    assert all(not b.attn.use_sdpa for b in model.blocks)
    logits_ref, loss_ref = model(idx, targets)
    torch.testing.assert_close(logits_sdpa, logits_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_sdpa, loss_ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# Positional encodings and causality
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos,i", [(0, 0), (1, 0), (7, 3), (50, 10), (127, 63)])
def test_sinusoidal_table_matches_formula(pos, i):
    d = 128
    pe = sinusoidal_table(128, d)
    angle = pos / 10000 ** (2 * i / d)
    assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_model_adds_the_table_and_has_no_position_parameters():
    cfg = small_cfg("sinusoidal")
    model = make_model(cfg)
    torch.testing.assert_close(model.pos_table, sinusoidal_table(cfg.block_size, cfg.n_embd))
    assert model.wpe is None
    assert "pos_table" not in model.state_dict()  # rebuilt from the config, never saved


def test_rope_scores_depend_only_on_relative_offset():
    torch.manual_seed(0)
    hs = 8
    cos, sin = rope_tables(64, hs)
    q, k = torch.randn(hs), torch.randn(hs)

    def score(m: int, n: int) -> float:  # q at position m, k at position n
        qm = apply_rope(q.expand(64, hs)[None, None], cos, sin)[0, 0, m]
        kn = apply_rope(k.expand(64, hs)[None, None], cos, sin)[0, 0, n]
        return float(qm @ kn)

    assert score(10, 7) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(5, 5) == pytest.approx(float(q @ k), abs=1e-4)  # offset 0: no rotation


@pytest.mark.parametrize("pos", POS)
def test_future_tokens_never_change_earlier_logits(pos):
    model = make_model(small_cfg(pos))
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 96, (2, 16), generator=gen)
    base, _ = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t:] = torch.randint(0, 96, (2, 16 - t), generator=gen)
        logits, _ = model(changed)
        torch.testing.assert_close(logits[:, :t], base[:, :t], atol=1e-6, rtol=0)
        if t < 15:  # and the changed positions do see the change
            assert not torch.allclose(logits[:, t:], base[:, t:])


# --------------------------------------------------------------------------------------
# Forward contract
# --------------------------------------------------------------------------------------


def test_forward_shapes_loss_and_ignore_index():
    model = make_model(small_cfg())
    idx = torch.randint(0, 96, (2, 10))
    targets = torch.randint(0, 96, (2, 10))
    logits, loss = model(idx)
    assert logits.shape == (2, 10, 96) and logits.dtype == torch.float32 and loss is None
    masked = targets.clone()
    masked[:, :4] = -1
    _, loss = model(idx, masked)
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, 96), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_initial_loss_is_near_uniform():
    """GPT-2 init gives small logits, so the first loss is about ln(V)."""
    model = make_model(small_cfg(vocab_size=512))
    idx = torch.randint(0, 512, (4, 16))
    _, loss = model(idx, torch.randint(0, 512, (4, 16)))
    assert loss.item() == pytest.approx(math.log(512), abs=0.1)


def test_forward_rejects_sequences_longer_than_block_size():
    model = make_model(small_cfg())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


# --------------------------------------------------------------------------------------
# Parameters, init, tying
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos", POS)
@pytest.mark.parametrize("bias", [False, True])
def test_num_params_matches_formula(pos, bias):
    for extra in ({}, {"mlp_ratio": 2, "activation": "relu", "n_layer": 3}):
        cfg = small_cfg(pos, bias=bias, **extra)
        model = GPT(cfg)
        for exclude in (True, False):
            assert model.num_params(exclude) == analytic_num_params(cfg, exclude)
    if pos == "learned":  # only learned positions are parameters
        assert model.num_params(False) - model.num_params(True) == cfg.block_size * cfg.n_embd


def test_gpt2_preset_has_124m_parameters():
    cfg = PRESETS["gpt2-124m"]
    assert analytic_num_params(cfg) == GPT2_124M_PARAMS
    assert analytic_num_params(cfg, exclude_position=False) == GPT2_124M_PARAMS + 1024 * 768
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(cfg)
    assert model.num_params() == GPT2_124M_PARAMS
    assert 1.0e6 < GPT(PRESETS["tiny"]).num_params() < 1.1e6


def test_lm_head_is_tied_to_the_token_embedding():
    model = make_model(small_cfg())
    assert model.lm_head.weight is model.wte.weight
    assert sum(p is model.wte.weight for p in model.parameters()) == 1  # listed once
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_gpt2_style_init():
    cfg = small_cfg(bias=True, n_embd=128, n_layer=4)
    model = make_model(cfg)
    for block in model.blocks:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            assert proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.count_nonzero(block.mlp.c_fc.bias) == 0
        assert torch.all(block.ln_1.weight == 1)


@pytest.mark.parametrize("pos", ["sinusoidal", "rotary"])
def test_meta_init_then_init_weights_rebuilds_fixed_tables(pos):
    cfg = small_cfg(pos)
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    reference = GPT(cfg)
    for name, buf in reference.named_buffers():
        torch.testing.assert_close(dict(model.named_buffers())[name], buf)


# --------------------------------------------------------------------------------------
# Optimizer and training
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_optimizer_decays_matrices_only_each_parameter_once(bias):
    model = GPT(small_cfg("learned", bias=bias))
    opt = configure_optimizer(
        model, weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), device_type="cpu"
    )
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert any(p is model.wte.weight for p in decay["params"])
    n_layernorms = 2 * 2 + 1  # two per block, two blocks, plus ln_f
    n_1d = n_layernorms * 2 + 4 * 2 if bias else n_layernorms  # gains, LN and Linear biases
    assert len(no_decay["params"]) == n_1d


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy 2-core machine OpenMP threads
    waiting on each other made this test 10x slower; use one thread, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("pos", POS)
def test_tiny_model_overfits_one_batch(pos, one_thread):
    """Memorising 4x32 random tokens needs working attention, positions and gradients."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64, pos_encoding=pos)
    model = GPT(cfg).train()
    data = torch.randint(0, 64, (4, 33))
    idx, targets = data[:, :-1], data[:, 1:]  # (4, 32) each, shifted by one
    opt = configure_optimizer(model, 0.0, 3e-3, (0.9, 0.95), "cpu")
    for _ in range(300):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05


def test_dropout_runs_in_training_on_both_attention_paths():
    model = GPT(small_cfg("rotary", dropout=0.2)).train()
    idx = torch.randint(0, 96, (2, 16))
    for use_sdpa in (True, False):
        model.set_use_sdpa(use_sdpa)
        _, loss = model(idx, idx)
        loss.backward()
        assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------
# FLOPs and MFU
# --------------------------------------------------------------------------------------


def test_flops_per_token_gpt2_by_hand():
    cfg = PRESETS["gpt2-124m"]
    by_hand = 6 * 123_587_328 + 12 * 12 * 12 * 64 * 1024  # 741,523,968 + 113,246,208
    assert flops_per_token(cfg) == by_hand == 854_770_176
    assert flops_per_token(cfg, n_params=100) == 600 + 12 * 12 * 12 * 64 * 1024


def test_mfu_matches_design_reference():
    """DESIGN.md: 472k tokens/s on GPT-2 124M at T=1024 is 40.8% MFU of 989 TFLOP/s."""
    value = mfu(472e3, PRESETS["gpt2-124m"], None, PEAK_FLOPS["h100-sxm-bf16"], world_size=1)
    assert value == pytest.approx(0.408, abs=0.01)
    with pytest.raises(ValueError, match="peak"):
        mfu(1.0, PRESETS["tiny"], None, 0.0, world_size=1)


def test_peak_flops_lookup():
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert peak_flops_for_name("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert peak_flops_for_name("NVIDIA H200", torch.float16) == 989e12
    assert peak_flops_for_name("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert peak_flops_for_name("NVIDIA H100 80GB HBM3", torch.float32, tf32=False) < 100e12
    assert peak_flops_for_name("Some Future GPU", torch.bfloat16) is None


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"n_embd": 30}, "n_embd"),  # not divisible by n_head=4
        ({"n_embd": 12, "n_head": 4, "pos_encoding": "rotary"}, "n_embd/n_head"),  # size 3: odd
        ({"vocab_size": 0}, "vocab_size"),
        ({"block_size": -1}, "block_size"),
        ({"n_layer": 1.5}, "n_layer"),
        ({"dropout": 1.0}, "dropout"),
        ({"pos_encoding": "alibi"}, "pos_encoding"),
        ({"activation": "swish"}, "activation"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
        ({"rope_base": 0.0}, "rope_base"),
        ({"bias": "yes"}, "bias"),
    ],
)
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}"):
        small_cfg(**kw)


def test_from_params_reads_model_config_and_pads_vocab():
    params = SimpleNamespace(
        n_layer=4,
        n_head=4,
        n_embd=128,
        block_size=128,
        dropout=0.1,
        bias=True,
        pos_encoding="rotary",
        activation="relu",
    )
    cfg = GPTConfig.from_params(params, vocab_size=50257)
    assert cfg.vocab_size == 50304
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (4, 4, 128, 128)
    assert (cfg.dropout, cfg.bias, cfg.pos_encoding, cfg.activation) == (
        0.1,
        True,
        "rotary",
        "relu",
    )
    assert GPTConfig.from_params(params, vocab_size=2048).vocab_size == 2048


@given(st.integers(1, 10**6), st.integers(1, 256))
def test_padded_vocab_is_the_next_multiple(n, multiple):
    p = padded_vocab(n, multiple)
    assert p % multiple == 0 and n <= p < n + multiple
