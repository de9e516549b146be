"""Export an lmforge model folder as a Hugging Face `transformers` GPT-2 checkpoint.

    lmforge export --format hf --model models/finetune --tokenizer data/tokenizer/tokenizer.json --out exports/hf

writes `exports/hf/` holding `config.json` (a `GPT2Config`), `model.safetensors` (the weights
under HF's GPT-2 names) and the tokenizer (`tokenizer.json` + `tokenizer_config.json`), so

    model = GPT2LMHeadModel.from_pretrained("exports/hf", local_files_only=True)
    tok = AutoTokenizer.from_pretrained("exports/hf", local_files_only=True)

load offline and give the same logits as `pipeline.model.gpt.GPT` (checked to 1e-5 in the tests).

How our GPT maps onto HF GPT-2:

- Same pre-LayerNorm block, fused q,k,v projection (q, k, v concatenated in that order),
  tanh GELU (HF `gelu_new`), LayerNorm eps 1e-5, attention scaled by 1/√head_size
  (`scale_attn_weights=True`), tied LM head (`tie_word_embeddings=True`, so
  `lm_head.weight` is not stored, as HF's own `save_pretrained` does).
- HF GPT-2 uses `Conv1D` (y = x·W + b with W of shape (in, out)) where we use `nn.Linear`
  (W of shape (out, in)), so every projection weight is transposed.
- HF GPT-2 always has biases, in Linear layers and LayerNorms; a `bias=False` model gets
  zeros there, which computes exactly the same function.
- `mlp_ratio` maps to `n_inner = mlp_ratio * n_embd`; `vocab_size` is the model's padded
  vocabulary (the embedding's size), which may exceed the tokenizer's real vocabulary.
- No GPT-2 equivalent: sinusoidal or rotary positions (GPT-2 adds a learned `wpe` table) and
  ReLU (GPT-2's MLP is GELU). Those raise `ExportError` naming the config key.

The tokenizer is saved as a `PreTrainedTokenizerFast` over our byte-level BPE `tokenizer.json`
with the end-of-text token (the first of `tokenizer.special_tokens`, as the tokenizer's meta.json
names it; `<|endoftext|>` by default) as bos/eos. Note that HF encodes a literal special token in
text as the special id (the usual GPT-2 behaviour), whereas `pipeline.text.tokenizer.encode_docs`
treats it as data; text without such a string encodes to identical ids.
Written with transformers 5, the export needs transformers >= 5 to load: its
`tokenizer_config.json` names `TokenizersBackend`, v5's name for the fast tokenizer class.

`transformers` is optional (`pip install 'lmforge[hf]'`): it is imported only inside
`export_hf`, so the pure-torch mapping (`check_gpt2_compatible`, `to_gpt2_state_dict`,
`gpt2_config_dict`) works without it. The output folder is written atomically: a failed
export leaves any previous export at `out_dir` as it was.
"""  # noqa: E501

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from pipeline.core.errors import LmforgeError
from pipeline.core.io import atomic_dir
from pipeline.core.names import MODEL_CONFIG_FILE, WEIGHTS_FILE
from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.load import read_model_files
from pipeline.text.shards import META_FILE, read_meta
from pipeline.text.tokenizer import end_of_text, load_tokenizer

LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which pipeline.model.gpt uses
INSTALL_HINT = "pip install 'lmforge[hf]' (or: pip install 'transformers>=5,<6')"


class ExportError(LmforgeError):
    """The model, tokenizer or output path cannot be exported; the message says why."""


# --------------------------------------------------------------------------------------
# Pure torch: compatibility, weights and config (no transformers needed)
# --------------------------------------------------------------------------------------


def check_gpt2_compatible(cfg: GPTConfig, source: str = MODEL_CONFIG_FILE) -> None:
    """Raise `ExportError` listing every setting of `cfg` that HF GPT-2 cannot express.

    `source` names where the config came from, for the message. `mlp_ratio` is fine: GPT-2's
    `n_inner` sets the MLP width. Dropout and `bias` are fine too (bias=False -> zero biases).
    """
    problems = []
    if cfg.pos_encoding != "learned":
        problems.append(
            f"pos_encoding={cfg.pos_encoding!r}: GPT-2 needs pos_encoding='learned' "
            "(a learned position-embedding table added to the token embeddings)"
        )
    if cfg.activation != "gelu":
        problems.append(
            f"activation={cfg.activation!r}: GPT-2 needs activation='gelu' "
            "(tanh-approximated GELU, HF 'gelu_new')"
        )
    if problems:
        raise ExportError(
            f"{source}: this model has no Hugging Face GPT-2 equivalent: " + "; ".join(problems)
        )


def _conv1d_weight(linear: nn.Linear) -> Tensor:
    """nn.Linear weight (out, in) as HF Conv1D weight (in, out)."""
    return linear.weight.detach().t().contiguous().cpu()


def _bias_or_zeros(module: nn.Linear | nn.LayerNorm, size: int) -> Tensor:
    """The module's bias (size,), or zeros: HF GPT-2 always has one, and 0 changes nothing."""
    if module.bias is not None:
        return module.bias.detach().clone().cpu()
    return torch.zeros(size, dtype=module.weight.dtype)


def _layer_norm(ln: nn.LayerNorm, prefix: str) -> dict[str, Tensor]:
    d = ln.weight.numel()
    return {
        f"{prefix}.weight": ln.weight.detach().clone().cpu(),  # (d,)
        f"{prefix}.bias": _bias_or_zeros(ln, d),  # (d,)
    }


def _linear(linear: nn.Linear, prefix: str) -> dict[str, Tensor]:
    return {
        f"{prefix}.weight": _conv1d_weight(linear),  # (in, out)
        f"{prefix}.bias": _bias_or_zeros(linear, linear.out_features),  # (out,)
    }


def to_gpt2_state_dict(model: GPT) -> dict[str, Tensor]:
    """Our weights under `GPT2LMHeadModel`'s names, as fresh CPU tensors ready to save.

    Projection weights are transposed for HF's Conv1D; missing biases become zeros. The tied
    `lm_head.weight` is left out (HF re-ties it to `transformer.wte.weight` on load, and
    safetensors refuses two names for one storage). Raises `ExportError` for architectures
    GPT-2 cannot express.
    """
    check_gpt2_compatible(model.config, source="GPTConfig")
    assert model.wpe is not None  # guaranteed by pos_encoding == "learned"
    sd: dict[str, Tensor] = {
        "transformer.wte.weight": model.wte.weight.detach().clone().cpu(),  # (V, d)
        "transformer.wpe.weight": model.wpe.weight.detach().clone().cpu(),  # (T, d)
    }
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}"
        sd |= _layer_norm(block.ln_1, f"{p}.ln_1")
        sd |= _linear(block.attn.c_attn, f"{p}.attn.c_attn")  # (d, 3d): q, k, v side by side
        sd |= _linear(block.attn.c_proj, f"{p}.attn.c_proj")  # (d, d)
        sd |= _layer_norm(block.ln_2, f"{p}.ln_2")
        sd |= _linear(block.mlp.c_fc, f"{p}.mlp.c_fc")  # (d, r·d)
        sd |= _linear(block.mlp.c_proj, f"{p}.mlp.c_proj")  # (r·d, d)
    sd |= _layer_norm(model.ln_f, "transformer.ln_f")
    return sd


def gpt2_config_dict(
    cfg: GPTConfig, eos_token_id: int, *, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Keyword arguments for `transformers.GPT2Config` describing the same model as `cfg`.

    `eos_token_id` (the end-of-text id) is also the bos id, as in GPT-2. `dtype` is the
    weights' dtype, recorded so `from_pretrained(dtype="auto")` keeps it.
    """
    check_gpt2_compatible(cfg, source="GPTConfig")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,  # padded: the embedding's row count, not the tokenizer's
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.mlp_ratio * cfg.n_embd,
        "activation_function": "gelu_new",  # tanh GELU, GPT-2's original
        "layer_norm_epsilon": LAYER_NORM_EPS,
        # Our single dropout rate sits in the same three places as GPT-2's: after the
        # embeddings, on the attention weights and on each residual branch.
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "resid_pdrop": cfg.dropout,
        "scale_attn_weights": True,  # softmax(QKᵀ/√hs), as ours
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,  # lm_head shares wte, as ours
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


# --------------------------------------------------------------------------------------
# The export (needs transformers)
# --------------------------------------------------------------------------------------


def _require_transformers() -> Any:
    """The `transformers` module, or an `ExportError` saying how to install it."""
    try:
        import transformers
    except ImportError as e:
        raise ExportError(
            f"exporting to Hugging Face format needs the optional 'transformers' package "
            f"({e}); install it with: {INSTALL_HINT}"
        ) from None
    return transformers


def _load_model(model_dir: Path) -> GPT:
    """Our GPT from a model folder, in eval mode; errors name the folder or file."""
    if not model_dir.is_dir():
        raise ExportError(
            f"{model_dir}: model folder not found (expected model_config.json and "
            "model.safetensors, e.g. from `dvc repro finetune`)"
        )
    cfg, state = read_model_files(model_dir, hint="run `dvc repro finetune` first")
    check_gpt2_compatible(cfg, source=str(model_dir / MODEL_CONFIG_FILE))
    if "lm_head.weight" not in state and "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"]  # tied: written once by some writers
    model = GPT(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(
            f"{model_dir / WEIGHTS_FILE}: weights do not match {MODEL_CONFIG_FILE} ({e})"
        ) from None
    return model.eval()


def _tokenizer_eos(tokenizer_json: Path, vocab_size: int) -> tuple[str, int]:
    """(token, id) of the end-of-text token, after checking the tokenizer fits the model.

    The token is the one the tokenizer's meta.json (beside `tokenizer_json`) names, the first
    of `tokenizer.special_tokens`; without a meta.json, the special token at id 0.
    """
    tok = load_tokenizer(tokenizer_json)
    n = tok.get_vocab_size()
    if n > vocab_size:
        raise ExportError(
            f"{tokenizer_json}: the tokenizer has {n} tokens but the model's vocab_size is "
            f"{vocab_size}; is this the tokenizer the model was trained with?"
        )
    meta_path = tokenizer_json.parent / META_FILE
    meta = read_meta(meta_path.parent) if meta_path.is_file() else None
    return end_of_text(tok, meta, str(meta_path if meta else tokenizer_json))


def _check_paths(model_dir: Path, out_dir: Path) -> None:
    """Refuse an `out_dir` that would replace the model folder being read (or a parent)."""
    src, dst = model_dir.resolve(), out_dir.resolve()
    if src == dst or dst in src.parents:
        raise ExportError(f"--out {out_dir}: would overwrite the model folder {model_dir}")


def _write_tokenizer(
    transformers: Any, tokenizer_json: Path, folder: Path, max_len: int, eos: str
) -> None:
    """Save our tokenizer.json as a fast HF tokenizer (tokenizer.json + tokenizer_config.json).

    `eos` (the end-of-text token) is both bos and eos, as in GPT-2.
    """
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        bos_token=eos,
        eos_token=eos,
        model_max_length=max_len,  # HF warns on (and can truncate to) the context length
    )
    hf_tok.save_pretrained(str(folder))


def export_hf(model_dir: Path, tokenizer_json: Path, out_dir: Path) -> Path:
    """Write a `transformers` GPT-2 checkpoint of `model_dir` (with its tokenizer) to `out_dir`.

    `out_dir` receives config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json, atomically (a previous export there survives a failure). Raises
    `ExportError` (an `LmforgeError`) for a missing or mismatched model or tokenizer, an
    architecture GPT-2 cannot express, or when `transformers` is not installed. Returns
    `out_dir`.
    """
    model_dir, tokenizer_json, out_dir = Path(model_dir), Path(tokenizer_json), Path(out_dir)
    _check_paths(model_dir, out_dir)
    model = _load_model(model_dir)
    cfg = model.config
    eos, eos_id = _tokenizer_eos(tokenizer_json, cfg.vocab_size)
    transformers = _require_transformers()  # after the checks: they need no transformers
    weights = to_gpt2_state_dict(model)
    del model  # the export holds its own copy of the weights
    dtype = weights["transformer.wte.weight"].dtype
    hf_config = transformers.GPT2Config(**gpt2_config_dict(cfg, eos_id, dtype=dtype))
    with atomic_dir(out_dir) as tmp:
        hf_config.save_pretrained(str(tmp))
        # "format": "pt" is the metadata HF's own save_pretrained writes and checks on load.
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_tokenizer(transformers, tokenizer_json, tmp, cfg.block_size, eos)
    return out_dir
