"""Names shared by every layer: the stages of the chain, and the files they hand on.

Each stage name is a DVC stage in dvc.yaml, a module `pipeline.stages.<name>`, a Prefect
task of the flow and an MLflow child run; `tests/test_dvc_deps.py` checks dvc.yaml against it.

The file names are relative to the folder `paths.<key>` of params.yaml they live in (one
group per key below). The code builds every path from these; dvc.yaml spells the declared
ones out, and `tests/test_names.py` checks the two agree, so a rename here that is not made
in dvc.yaml (or the other way) fails a test instead of silently breaking staleness.
"""

STAGES = ("validate", "synthesize", "tokenizer", "pretrain", "finetune", "evaluate", "register")

# Several folders (validated, tokenizer, pretrain, a checkpoint, a registered package).
RESOLVED_CONFIG = "config.yaml"  # the resolved params a folder's files were made with
MODEL_CARD = "MODEL_CARD.md"  # a registered package (register): the model card


# paths.validated: the cleaned corpus.
def split_parquet(split: str) -> str:
    """The cleaned corpus of one split (`train`, `val`, `test`): `<split>.parquet`."""
    return f"{split}.parquet"


# paths.synthetic: the synthetic data and what it was made from.
PRETRAIN_TRAIN = "pretrain_train.parquet"  # the pretraining mix: real train split + synthetic
FINETUNE_TRAIN = "finetune_train.jsonl"  # the fine-tuning set, train part
FINETUNE_TEST = "finetune_test.jsonl"  # the fine-tuning set, held-out part
MIMIC = "mimic.json"  # the n-gram mimic model fitted on the real train split
STORYWORLD = "storyworld.json"  # the story-world grammar settings the synthetic docs used

# paths.tokenizer: the trained tokenizer and the encoded corpus.
TOKENIZER_FILE = "tokenizer.json"  # the byte-level BPE tokenizer (Hugging Face format)
META_FILE = "meta.json"  # vocab size, EOT id, dtype and token counts of the shards


def shard_file(split: str) -> str:
    """The token shard of one split: `<split>.bin`."""
    return f"{split}.bin"


# paths.pretrain and paths.finetune: a model folder (also a checkpoint's weights).
WEIGHTS_FILE = "model.safetensors"  # the model's weights
MODEL_CONFIG_FILE = "model_config.json"  # the GPTConfig the weights fit
METHODS_DIR = "methods"  # finetune only: methods/<method>/model.safetensors when comparing

# paths.checkpoints/step_<n>: a resumable checkpoint (besides the weights and config).
OPTIMIZER_FILE = "optimizer.pt"  # the optimizer state dict
STATE_FILE = "state.json"  # step, RNG states, loss history and the training digest
CHECKSUMS_FILE = "checksums.json"  # md5 of each file above, to refuse a damaged one

# paths.reports: the reports DVC declares as metrics, and their plots.
REGISTER_VERSION = "register_version.json"  # register: the registry's answer (no DVC output)
PLOTS_DIR = "plots"  # the plots subfolder
PRETRAIN_LOSS = "pretrain_loss.json"  # under plots/: pretrain's loss curve
LOSS_BY_POSITION = "loss_by_position.json"  # under plots/: evaluate's loss by position
RELIABILITY = "reliability.json"  # under plots/: evaluate's reliability diagram


def report_json(stage: str) -> str:
    """A stage's metrics report: `<stage>.json`."""
    return f"{stage}.json"


def report_md(stage: str) -> str:
    """A stage's human-readable report: `<stage>.md` (finetune, evaluate)."""
    return f"{stage}.md"


def failed_report(stage: str) -> str:
    """The report of a stage whose gate failed: `<stage>.failed.json` (no DVC output)."""
    return f"{stage}.failed.json"
