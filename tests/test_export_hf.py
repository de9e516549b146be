"""Hugging Face GPT-2 export: same logits and token ids after a round trip through transformers.

The compatibility and path-error tests need only torch; the round trips skip (with a reason)
when the optional `transformers` package is absent.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_write_json
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.serve.export_hf import (
    ExportError,
    check_gpt2_compatible,
    export_hf,
    gpt2_config_dict,
    to_gpt2_state_dict,
)
from pipeline.text.tokenizer import EOT, train_bpe
from pipeline.train import checkpoint as ckpt

NO_HF = "transformers is an optional dependency (pip install 'lmforge[hf]')"
TEXTS = [
    "Once upon a time there was a little fox who lived in the forest.",
    "The fox liked to run, and the rabbit liked to jump over the logs.",
    "One day the fox and the rabbit went to the river to drink water.",
] * 5


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32)
    return GPTConfig(**{**base, **overrides})


@torch.no_grad()
def random_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A GPT whose every parameter is random, LayerNorm gains and biases included, so a
    mapping that drops, swaps or mis-transposes any tensor changes the logits."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    for name, p in model.named_parameters():
        if "ln" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))  # gains near 1
        else:
            p.normal_(0.0, 0.1)
    return model.eval()


def write_model_folder(folder: Path, model: GPT) -> Path:
    """A model folder as the finetune stage writes it: model_config.json + model.safetensors."""
    folder.mkdir(parents=True)
    ckpt.save_weights(folder / "model.safetensors", model.state_dict())
    atomic_write_json(folder / "model_config.json", dataclasses.asdict(model.config))
    return folder


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = train_bpe(TEXTS, vocab_size=300, special_tokens=[EOT], min_frequency=2)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


# --------------------------------------------------------------------------------------
# Compatibility and errors (no transformers needed)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"pos_encoding": "rotary"}, "pos_encoding='rotary'"),
        ({"pos_encoding": "sinusoidal"}, "pos_encoding='sinusoidal'"),
        ({"activation": "relu"}, "activation='relu'"),
    ],
)
def test_incompatible_architecture_names_the_key(override: dict, key: str) -> None:
    cfg = tiny_config(**override)
    with pytest.raises(ExportError, match="GPT-2 needs") as info:
        check_gpt2_compatible(cfg)
    assert key in str(info.value)
    with pytest.raises(ExportError, match=key):
        to_gpt2_state_dict(GPT(cfg))


def test_incompatible_model_folder_names_file(tmp_path: Path, tokenizer_json: Path) -> None:
    folder = write_model_folder(tmp_path / "m", GPT(tiny_config(pos_encoding="rotary")))
    with pytest.raises(LmforgeError) as info:  # raised before transformers is imported
        export_hf(folder, tokenizer_json, tmp_path / "out")
    assert "model_config.json" in str(info.value) and "pos_encoding='rotary'" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(ExportError) as info:
        check_gpt2_compatible(tiny_config(pos_encoding="sinusoidal", activation="relu"))
    assert "pos_encoding" in str(info.value) and "activation" in str(info.value)


def test_mlp_ratio_maps_to_n_inner() -> None:
    check_gpt2_compatible(tiny_config(mlp_ratio=2))  # expressible: no error
    d = gpt2_config_dict(tiny_config(mlp_ratio=2), eos_token_id=0)
    assert d["n_inner"] == 64 and d["vocab_size"] == 320 and d["n_positions"] == 32
    assert d["activation_function"] == "gelu_new" and d["tie_word_embeddings"] is True


def test_state_dict_shapes_and_zero_biases() -> None:
    sd = to_gpt2_state_dict(GPT(tiny_config(bias=False)))
    assert "lm_head.weight" not in sd  # tied: HF re-ties it on load
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D (in, out)
    assert sd["transformer.h.1.mlp.c_proj.weight"].shape == (128, 32)
    assert torch.equal(sd["transformer.h.0.ln_1.bias"], torch.zeros(32))
    assert torch.equal(sd["transformer.h.0.attn.c_attn.bias"], torch.zeros(96))


def test_missing_model_folder_names_path(tmp_path: Path, tokenizer_json: Path) -> None:
    missing = tmp_path / "models" / "finetune"
    with pytest.raises(LmforgeError, match=str(missing)):
        export_hf(missing, tokenizer_json, tmp_path / "out")


def test_out_dir_cannot_replace_model(tmp_path: Path, tokenizer_json: Path) -> None:
    folder = write_model_folder(tmp_path / "m", GPT(tiny_config()))
    with pytest.raises(ExportError, match="overwrite the model folder"):
        export_hf(folder, tokenizer_json, folder)
    assert (folder / "model.safetensors").is_file()


def test_missing_transformers_says_how_to_install(
    tmp_path: Path, tokenizer_json: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_model_folder(tmp_path / "m", GPT(tiny_config()))
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(LmforgeError, match=r"pip install 'lmforge\[hf\]'"):
        export_hf(folder, tokenizer_json, tmp_path / "out")


# --------------------------------------------------------------------------------------
# Round trips through transformers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [{"bias": False}, {"bias": True, "mlp_ratio": 2, "dropout": 0.1}],
    ids=["no-bias", "bias-mlp2-dropout"],
)
def test_logits_match_transformers(tmp_path: Path, tokenizer_json: Path, overrides: dict) -> None:
    transformers = pytest.importorskip("transformers", reason=NO_HF)
    model = random_model(tiny_config(**overrides))
    folder = write_model_folder(tmp_path / "m", model)
    out = export_hf(folder, tokenizer_json, tmp_path / "exports" / "hf")
    assert out == tmp_path / "exports" / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    idx = torch.randint(0, model.config.vocab_size, (3, model.config.block_size))  # (B, T)
    with torch.no_grad():
        ours, _ = model(idx)  # (B, T, V)
    for attn in ("sdpa", "eager"):  # HF's fused and written-out attention paths
        hf, info = transformers.GPT2LMHeadModel.from_pretrained(
            out, local_files_only=True, output_loading_info=True, attn_implementation=attn
        )
        assert not any(info.values()), info  # no missing, unexpected or mismatched keys
        assert not hf.training  # from_pretrained returns eval mode: dropout off on both sides
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # re-tied
        with torch.no_grad():
            theirs = hf(idx).logits  # (B, T, V)
        assert theirs.shape == ours.shape
        assert (theirs - ours).abs().max().item() < 1e-5, attn


def test_tokenizer_matches(tmp_path: Path, tokenizer_json: Path) -> None:
    transformers = pytest.importorskip("transformers", reason=NO_HF)
    from pipeline.text.tokenizer import encode_docs, load_tokenizer

    folder = write_model_folder(tmp_path / "m", random_model(tiny_config()))
    out = export_hf(folder, tokenizer_json, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = load_tokenizer(tokenizer_json)
    text = "The little fox went to the river. Ünïcode ✓ and 42 numbers!"
    assert hf_tok(text)["input_ids"] == encode_docs(ours, [text])[0]
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text
    assert hf_tok.eos_token == hf_tok.bos_token == EOT
    assert hf_tok.eos_token_id == 0
    hf_config = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
    assert hf_config.eos_token_id == hf_config.bos_token_id == 0


def test_failed_export_keeps_previous(
    tmp_path: Path, tokenizer_json: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers", reason=NO_HF)
    import pipeline.serve.export_hf as export_mod

    folder = write_model_folder(tmp_path / "m", random_model(tiny_config()))
    out = export_hf(folder, tokenizer_json, tmp_path / "exports" / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs) -> None:
        raise OSError("disk full")

    # Fails inside the atomic folder, after config.json and the weights were written there.
    monkeypatch.setattr(export_mod, "_write_tokenizer", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(folder, tokenizer_json, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["hf"]  # no temporary folder left


@pytest.mark.parametrize("with_meta", [True, False])
def test_another_end_of_text_token_becomes_bos_and_eos(tmp_path: Path, with_meta: bool) -> None:
    """The first of tokenizer.special_tokens ("<|end|>" here), as meta.json names it, is the
    export's bos/eos; without a meta.json beside the tokenizer, the special token at id 0."""
    transformers = pytest.importorskip("transformers", reason=NO_HF)
    from pipeline.text.shards import write_meta

    specials = ["<|end|>", EOT]
    tok = train_bpe(TEXTS, vocab_size=300, special_tokens=specials, min_frequency=2)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    if with_meta:
        meta = {"format_version": 1, "dtype": "uint16", "vocab_size": tok.get_vocab_size()}
        write_meta(tok_dir, meta | {"eot_id": 0, "special_tokens": specials, "splits": {}})
    folder = write_model_folder(tmp_path / "m", random_model(tiny_config()))
    out = export_hf(folder, tok_dir / "tokenizer.json", tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok.eos_token == hf_tok.bos_token == "<|end|>"
    assert hf_tok.eos_token_id == tok.token_to_id("<|end|>") == 0
    hf_config = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
    assert hf_config.eos_token_id == hf_config.bos_token_id == 0


def test_meta_json_naming_a_token_the_tokenizer_lacks_is_refused(
    tmp_path: Path, tokenizer_json: Path
) -> None:
    from pipeline.text.shards import write_meta

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    meta = {"format_version": 1, "dtype": "uint16", "vocab_size": 300, "splits": {}}
    write_meta(tok_dir, meta | {"eot_id": 0, "special_tokens": ["<|end|>"]})
    folder = write_model_folder(tmp_path / "m", random_model(tiny_config()))
    with pytest.raises(
        LmforgeError, match=r"tok/meta\.json: eot_id 0 .*special_tokens\[0\] '<\|end\|>'"
    ):
        export_hf(folder, tok_dir / "tokenizer.json", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
