"""The schema of `params.yaml`: a tree of frozen dataclasses, each field with its doc and range.

A field without a default is required in `params.yaml`; a field with a default may be
omitted (only list entries such as sources use defaults). `pipeline.config.loader` builds a
`Config` from the file, presets and `--set` overrides and checks every key against this
schema. Standard library and pyyaml only (the GPU machine has nothing else).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config.decoding import MAX_SEED, Strategy, check_fields

PARAMS_FILE = "params.yaml"
PRESETS_DIR = "presets"


class ConfigError(ValueError):
    """A params file, preset or override is invalid; the message names every bad key."""


def spec(
    doc: str,
    *,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    **kw: Any,
) -> Any:
    """A dataclass field carrying its documentation and allowed range.

    `min` and `max` are inclusive bounds, `above` an exclusive lower bound (value > above).
    """
    return field(metadata={"doc": doc, "min": min, "max": max, "above": above}, **kw)


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PathsConfig:
    """Where stages read and write, relative to the project root (the folder of params.yaml)."""

    validated: str = spec("validate: cleaned, split corpus (train/val/test parquet)")
    data_docs: str = spec("validate: Great Expectations Data Docs (HTML)")
    synthetic: str = spec("synthesize: pretraining mix, fine-tuning set, source models")
    tokenizer: str = spec("tokenizer: tokenizer.json, meta.json and the token shards")
    pretrain: str = spec("pretrain: the final model, its config and the resolved config")
    checkpoints: str = spec("pretrain: resumable checkpoints (working state, not a DVC output)")
    finetune: str = spec("finetune: the chosen method's model; methods/<m>/ when comparing")
    reports: str = spec("per-stage metrics, reports/<stage>.json")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking; `MLFLOW_TRACKING_URI` in the environment wins over `uri`."""

    enabled: bool = spec("log to MLflow (off: stages still write reports)")
    uri: str = spec("tracking URI; a relative sqlite path is taken from the project root")
    experiment: str = spec("MLflow experiment name")


@dataclass(frozen=True)
class SourceConfig:
    """One corpus source. `kind` selects the reader; unused fields keep their defaults."""

    kind: Literal["storyworld", "txt", "jsonl", "parquet", "csv", "hub"] = spec(
        "reader: built-in story world, a local file format, or a Hugging Face Hub dataset"
    )
    name: str = spec("label stored in the `source` column", default="")
    path: str = spec("file, folder or glob for local kinds (relative to the root)", default="")
    text_field: str = spec("column holding the text (jsonl/parquet/csv/hub)", default="text")
    txt_mode: Literal["file", "paragraph", "line"] = spec(
        "txt: one document per file, per blank-line-separated block, or per line",
        default="paragraph",
    )
    dataset: str = spec("hub: dataset name, e.g. 'roneneldan/TinyStories'", default="")
    subset: str = spec("hub: configuration name", default="")
    split: str = spec("hub: split to read", default="train")
    max_docs: int = spec("stop after this many documents (0 = all)", default=0, min=0)
    num_docs: int = spec("storyworld: documents to generate", default=0, min=0)


@dataclass(frozen=True)
class StoryWorldConfig:
    """The synthetic story-world grammar (pipeline/data/storyworld.py)."""

    num_characters: int = spec("names used by the grammar", min=1, max=24)
    num_objects: int = spec("objects used by the grammar", min=1, max=24)
    num_places: int = spec("places used by the grammar", min=1, max=16)
    min_sentences: int = spec("fewest events in a story", min=1, max=64)
    max_sentences: int = spec("most events in a story", min=1, max=64)
    stop_prob: float = spec("chance a story ends after each later event", min=0.01, max=1)
    max_cast: int = spec("most characters in one story", min=1, max=24)


@dataclass(frozen=True)
class ValidateConfig:
    """Ingest, Great Expectations gate, cleaning and splitting."""

    sources: list[SourceConfig] = spec("corpus sources, read in order")
    chunk_rows: int = spec("rows per streamed chunk", min=1)
    gx_sample_rows: int = spec("seeded sample size for row-level GX expectations", min=1)
    min_chars: int = spec("shortest allowed document (characters)", min=1)
    max_chars: int = spec("longest allowed document (characters)", min=1)
    min_rows: int = spec("fewest documents in the corpus", min=1)
    max_rows: int = spec("most documents in the corpus", min=1)
    max_duplicate_fraction: float = spec("largest share of exact duplicates", min=0.0, max=1.0)
    min_printable_fraction: float = spec("smallest share of printable chars", min=0.0, max=1.0)
    pii_mostly: float = spec(
        "share of documents that must match no PII regex (the rest are dropped)", min=0, max=1
    )
    length_mostly: float = spec(
        "share of documents that must be min_chars..max_chars long (the rest are dropped)",
        min=0,
        max=1,
    )
    printable_mostly: float = spec(
        "share of documents that must reach min_printable_fraction (the rest are dropped)",
        min=0,
        max=1,
    )
    min_rows_per_source: int = spec("fewest documents each source must give", min=0)
    drop_pii: bool = spec("cleaning: drop documents that match a PII regex")
    strip_whitespace: bool = spec("cleaning: strip leading/trailing whitespace")
    val_fraction: float = spec("share of documents in val (by document hash)", min=0, max=0.5)
    test_fraction: float = spec("share of documents in test (by document hash)", min=0, max=0.5)


@dataclass(frozen=True)
class MimicConfig:
    """The smoothed character n-gram fitted on the training split (pipeline/data/ngram.py)."""

    order: int = spec("n-gram order", min=1, max=12)
    smoothing: Literal["kneser_ney", "add_k"] = spec("smoothing method")
    k: float = spec("add-k pseudo-count", min=1e-9)
    discount: float = spec("Kneser-Ney absolute discount", min=0.01, max=0.99)
    max_chars: int = spec("longest sampled document", min=1)


@dataclass(frozen=True)
class SynthesizeConfig:
    """Synthetic pretraining augmentation, the fine-tuning set, and their checks."""

    generators: list[Literal["storyworld", "mimic"]] = spec("augmentation generators")
    synthetic_share: float = spec(
        "share of pretraining train bytes that is synthetic", min=0, max=0.95
    )
    max_synthetic_docs: int = spec("cap on generated augmentation documents", min=0)
    entropy_docs: int = spec("story-world docs for the entropy-rate estimate", min=100)
    finetune_docs: int = spec("stories (or passages) turned into fine-tuning examples", min=1)
    finetune_test_fraction: float = spec("held-out share of the fine-tuning set", min=0.01, max=0.9)
    continuation_chars: int = spec("real text: prompt length of continuation pairs", min=8)
    max_unigram_kl: float = spec(
        "drift gate: largest char-unigram KL(synthetic||real), bits", min=0
    )
    max_length_distance: float = spec("drift gate: largest length-distribution distance", min=0)
    contamination_ngram: int = spec("contamination: shared word n-gram length", min=4)
    max_contaminated_fraction: float = spec(
        "gate: largest share of synthetic docs dropped for overlapping val/test", min=0, max=1
    )
    mimic: MimicConfig = spec("the n-gram mimic")


@dataclass(frozen=True)
class TokenizerConfig:
    """Byte-level BPE (Hugging Face tokenizers) and the token shards."""

    vocab_size: int = spec("BPE vocabulary size, special tokens included", min=260, max=2**20)
    min_frequency: int = spec("a merge needs a pair seen at least this often", min=1)
    special_tokens: list[str] = spec("added tokens; the first one separates documents")
    encode_batch_docs: int = spec("documents per encode_batch call", min=1)


@dataclass(frozen=True)
class ModelConfig:
    """The GPT architecture (pipeline/model/gpt.py); vocab size comes from the tokenizer."""

    n_layer: int = spec("transformer blocks", min=1, max=256)
    n_head: int = spec("attention heads per block", min=1, max=256)
    n_embd: int = spec("model width d", min=8)
    block_size: int = spec("context length T", min=2)
    dropout: float = spec("dropout probability", min=0.0, max=0.9)
    bias: bool = spec("biases in linear layers and LayerNorms")
    pos_encoding: Literal["learned", "sinusoidal", "rotary"] = spec("positional encoding")
    activation: Literal["gelu", "relu"] = spec("feed-forward activation")


@dataclass(frozen=True)
class PretrainConfig:
    """GPT pretraining under torchrun: one process, DDP or FSDP2, CPU or GPU."""

    nproc_per_node: int = spec("processes torchrun starts on this machine", min=1, max=64)
    strategy: Literal["auto", "single", "ddp", "fsdp"] = spec(
        "auto: single with one process, DDP with more"
    )
    device: Literal["auto", "cpu", "cuda"] = spec("auto: CUDA when available")
    dtype: Literal["auto", "float32", "bfloat16"] = spec(
        "auto: bf16 autocast on CUDA and on CPUs with native bf16 (avx512_bf16, amx_bf16), "
        "fp32 on other CPUs; bfloat16 autocasts on any CPU"
    )
    # YAML 1.1 reads a bare on/off (also in `--set pretrain.compile=on`) as true/false, so
    # the booleans are accepted too and read as "on"/"off" (`__post_init__`).
    compile: Literal["auto", "on", "off", True, False] = spec(
        "torch.compile: auto (on for CUDA, and on CPU with bf16 and a C++ compiler), "
        "on/true or off/false"
    )
    max_steps: int = spec("optimizer steps", min=1)
    micro_batch_size: int = spec("sequences per process per forward/backward", min=1)
    tokens_per_step: int = spec("global tokens per optimizer step (sets grad accumulation)", min=1)
    lr: float = spec("peak learning rate", min=0.0, max=10.0)
    min_lr: float = spec("learning rate at the end of the cosine decay", min=0.0, max=10.0)
    warmup_steps: int = spec("linear warm-up steps", min=0)
    weight_decay: float = spec("AdamW weight decay (matrices only)", min=0.0, max=10.0)
    beta1: float = spec("AdamW beta1", min=0.0, max=1.0)
    beta2: float = spec("AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = spec("max global gradient norm (0 = off)", min=0.0)
    eval_interval: int = spec("steps between validation evaluations", min=1)
    eval_batches: int = spec("micro-batches per validation evaluation", min=1)
    log_interval: int = spec("steps between progress lines and metric batches", min=1)
    checkpoint_interval: int = spec("steps between checkpoints", min=1)
    keep_checkpoints: int = spec("checkpoints kept on disk (the newest)", min=1)
    resume: bool = spec("continue from the newest checkpoint in the output folder if any")
    deterministic: bool = spec(
        "reproducible GPU runs: deterministic algorithms, CUBLAS_WORKSPACE_CONFIG, math SDPA "
        "(slower; CPU runs are deterministic either way)"
    )

    def __post_init__(self) -> None:
        value = self.compile
        if isinstance(value, bool):
            object.__setattr__(self, "compile", "on" if value else "off")
        elif not isinstance(value, str):  # 1 == True passes the Literal check
            raise ConfigError(
                f"pretrain.compile: expected one of 'auto', 'on', 'off', got {value!r}"
            )


@dataclass(frozen=True)
class FinetuneConfig:
    """SWA and/or SAM fine-tuning from the pretrained weights."""

    method: Literal["adamw", "sam", "swa", "sam+swa"] = spec("the method whose model moves on")
    compare: bool = spec("also run every other method from the same start, same data order")
    data: Literal["task", "corpus"] = spec(
        "task: the fine-tuning set from synthesize; corpus: keep training on the pretrain shards"
    )
    max_steps: int = spec("optimizer steps per method", min=1)
    micro_batch_size: int = spec("examples per step", min=1)
    lr: float = spec("AdamW learning rate (constant after warm-up)", min=0.0, max=10.0)
    warmup_steps: int = spec("linear warm-up steps", min=0)
    weight_decay: float = spec("AdamW weight decay (matrices only)", min=0.0, max=10.0)
    grad_clip: float = spec("max gradient norm (0 = off)", min=0.0)
    sam_rho: float = spec("SAM neighbourhood radius rho", min=1e-6, max=10.0)
    sam_adaptive: bool = spec("ASAM: scale the ascent by |w|")
    swa_start: float = spec("fraction of training after which SWA averages", min=0.0, max=0.99)
    swa_lr: float = spec("SWALR's constant learning rate during averaging", min=0.0, max=10.0)
    swa_anneal_steps: int = spec("SWALR's annealing steps into swa_lr", min=1)
    swa_ema: bool = spec("average with an EMA (get_ema_multi_avg_fn) instead of equal weights")
    swa_ema_decay: float = spec("EMA decay", min=0.0, max=1.0)
    eval_examples: int = spec("held-out examples scored per method (0 = all)", min=0)
    replay: float = spec(
        "weight of a language-model loss on a pretraining batch added to every task step "
        "(0 = off): keeps the model a language model while it learns the task",
        min=0.0,
        max=100.0,
    )
    sharpness_rho: float = spec("radius of the epsilon-sharpness ball", min=1e-6)
    sharpness_steps: int = spec("projected ascent steps for epsilon-sharpness", min=1)
    hessian_iters: int = spec(
        "Hessian-vector products per Lanczos run (one run each for the largest and the "
        "smallest Hessian eigenvalue)",
        min=1,
    )


@dataclass(frozen=True)
class DecodingConfig:
    """How to decode: the one set of decoding settings (pipeline/config/decoding.py).

    `register.decoding` (the served model's defaults), every request to the served model
    (`pipeline.serve.textgen.GenerationParams` adds `return_full_text`), evaluate's
    strategies and `pipeline.model.generate` all use it. Checked on construction against
    these specs (`check_fields`): the same bounds the loader checks in params.yaml.
    temperature, top_k and top_p apply to strategy sample only, num_beams to beam only;
    no_repeat_ngram_size and repetition_penalty apply to every strategy (before the filters).
    """

    strategy: Strategy = spec("greedy, sample or beam search")
    max_new_tokens: int = spec("longest continuation, at most the model's block_size", min=1)
    temperature: float = spec("sampling temperature; greedy is the argmax", above=0, max=10.0)
    top_k: int = spec("top-k sampling cut-off, 0 = off", min=0)
    top_p: float = spec("nucleus sampling mass, 1 = off", above=0, max=1.0)
    num_beams: int = spec("beam width", min=1, max=64)
    seed: int = spec("sampling seed", min=0, max=MAX_SEED)
    no_repeat_ngram_size: int = spec("no n-gram of this size twice in the sequence, 0 = off", min=0)
    repetition_penalty: float = spec(
        "CTRL penalty on tokens already in the sequence, 1 = off", above=0, max=10.0
    )

    def __post_init__(self) -> None:
        check_fields(self, DECODING_FIELDS)
        # 1 -> 1.0, as the loader converts floats
        for name in ("temperature", "top_p", "repetition_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))


DECODING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DecodingConfig))


def decoding_spec(name: str, doc: str) -> Any:
    """A required field of another section that takes a DecodingConfig field's bounds."""
    meta = next(f.metadata for f in dataclasses.fields(DecodingConfig) if f.name == name)
    return spec(doc, min=meta["min"], max=meta["max"], above=meta["above"])


@dataclass(frozen=True)
class EvaluateConfig:
    """Held-out scores, KL to the true source, calibration, sharpness and decoding."""

    test_windows: int = spec("context windows of the test shard scored (0 = all)", min=0)
    source_docs: int = spec("fresh source documents for the KL rate", min=10)
    calibration_bins: int = spec("bins of the reliability diagram", min=2, max=100)
    sharpness_batches: int = spec("test batches in the sharpness loss", min=1)
    prompts: int = spec("prompts decoded per strategy (k-NN precision/recall needs 4)", min=4)
    # Evaluate decodes with every strategy; these keys take DecodingConfig's bounds.
    max_new_tokens: int = decoding_spec("max_new_tokens", "longest generated continuation")
    temperature: float = decoding_spec("temperature", "temperature of the temperature strategy")
    top_k: int = decoding_spec("top_k", "cut-off of the top_k strategy")
    top_p: float = decoding_spec("top_p", "nucleus mass of the top_p strategy")
    num_beams: int = decoding_spec("num_beams", "beam width of the beam strategy")
    length_penalty: float = spec("beam score = log-prob / length ** penalty", min=0.0, max=5.0)
    no_repeat_ngram_size: int = decoding_spec(
        "no_repeat_ngram_size", "no-repeat n-gram size of every strategy (0 = off)"
    )
    repetition_penalty: float = decoding_spec(
        "repetition_penalty", "repetition penalty of every strategy (1 = off)"
    )
    samples_in_report: int = spec("generations per strategy shown in evaluate.md", min=0)


@dataclass(frozen=True)
class GateConfig:
    """The quality gate: a model failing any threshold is not registered (permissive = off).

    `min_gain_over_ngram` is relative, so it means the same on any corpus: the model must
    beat the n-gram baseline on the test split (`pipeline/data/baselines.py`) by that many
    bits/byte. `max_test_bits_per_byte` is absolute: 8 (a byte's worth) turns it off.
    """

    min_gain_over_ngram: float = spec(
        "least test bits/byte by which the model must beat the n-gram baseline (-8 = off)",
        min=-8.0,
        max=8.0,
    )
    max_test_bits_per_byte: float = spec("highest allowed test bits per byte (8 = off)", min=0.0)
    max_ece: float = spec("highest allowed expected calibration error", min=0.0, max=1.0)
    min_task_accuracy: float = spec("lowest allowed exact-match task accuracy", min=0.0, max=1.0)


@dataclass(frozen=True)
class RegisterConfig:
    """MLflow Model Registry: quality gate, versions, champion/challenger aliases, model card."""

    model_name: str = spec("registered model name")
    gate: GateConfig = spec("quality gate thresholds")
    promote_margin: float = spec(
        "test bits/byte by which a challenger must beat the champion to replace it", min=0.0
    )
    compare_docs: int = spec("test documents both models score for the comparison", min=1)
    decoding: DecodingConfig = spec("default decoding of the served model")
    card_samples: int = spec("decoding samples shown in the model card", min=0, max=50)


@dataclass(frozen=True)
class SweepSize:
    """One model size of the scaling sweep (the rest of the architecture is `model`)."""

    n_layer: int = spec("transformer blocks", min=1)
    n_head: int = spec("attention heads", min=1)
    n_embd: int = spec("model width (divisible by n_head)", min=1)


@dataclass(frozen=True)
class SweepConfig:
    """The scaling-law sweep (flows/scaling_flow.py): model sizes x token budgets."""

    sizes: list[SweepSize] = spec("model sizes, each pretrained at every budget")
    steps: list[int] = spec("optimizer steps per run; tokens = steps x pretrain.tokens_per_step")
    eval_batches: int = spec("validation batches for each point's final loss", min=1)


@dataclass(frozen=True)
class Config:
    """The whole of params.yaml. `root` is the project root, not a key of the file."""

    seed: int = spec("master seed; every stage derives its seeds from it", min=0)
    paths: PathsConfig = spec("stage inputs and outputs")
    tracking: TrackingConfig = spec("MLflow tracking")
    storyworld: StoryWorldConfig = spec("the story-world grammar")
    validate: ValidateConfig = spec("stage validate")
    synthesize: SynthesizeConfig = spec("stage synthesize")
    tokenizer: TokenizerConfig = spec("stage tokenizer")
    model: ModelConfig = spec("the GPT architecture")
    pretrain: PretrainConfig = spec("stage pretrain")
    finetune: FinetuneConfig = spec("stage finetune")
    evaluate: EvaluateConfig = spec("stage evaluate")
    register: RegisterConfig = spec("stage register")
    sweep: SweepConfig = spec("scaling-law sweep (not a DVC stage)")
    root: Path = field(default=Path("."), metadata={"internal": True})

    def path(self, key: str) -> Path:
        """Absolute path of `paths.<key>`, resolved against the project root."""
        return self.root / getattr(self.paths, key)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in params.yaml form (without `root`)."""
        out = dataclasses.asdict(self)
        out.pop("root")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
