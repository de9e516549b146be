"""Stage `tokenizer`: train a byte-level BPE on the training mix and encode the corpus to shards.

    dvc repro tokenizer
    python -m pipeline.stages.tokenizer --set tokenizer.vocab_size=4096

Reads `paths.synthetic/pretrain_train.parquet` (the training split mixed with synthetic
data, from synthesize) and `paths.validated/{val,test}.parquet`, and writes to
`paths.tokenizer/`:
- `tokenizer.json`: the BPE (Hugging Face `tokenizers` format), trained on the train mix;
- `train.bin`, `val.bin`, `test.bin`: the token shards (format in `pipeline/text/shards.py`:
  a 32-byte header, then uint16/uint32 tokens, an `<|endoftext|>` after every document);
- `meta.json`: vocabulary size, EOT id, dtype, per-split tokens/bytes/docs/md5, bytes per
  token, and the md5 of the training parquet the tokenizer was trained on;
- `config.yaml`: the resolved config.

Everything streams (parquet record batches from `pipeline/data/texts.py`, training and
encoding in `pipeline/text/encode.py`), so memory stays flat however large the corpus is.
The folder is replaced atomically: a failed run leaves the previous outputs in place. On
CPU a re-run is byte-identical.

`reports/tokenizer.json` holds the deterministic figures (no timings) DVC tracks as metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline.config import Config
from pipeline.core.io import atomic_dir, atomic_write_json
from pipeline.core.names import META_FILE, TOKENIZER_FILE, report_json, shard_file
from pipeline.data.texts import ParquetTexts
from pipeline.ops.stage_runner import stage_entry
from pipeline.ops.tracking import SPLIT_CONTEXT, start_run
from pipeline.text.encode import STAGE, build_report, input_paths, tokenize_into


def run(cfg: Config) -> dict[str, Any]:
    """Train the tokenizer and write the shards; a failure leaves the old outputs intact."""
    inputs = input_paths(cfg)
    out_dir = cfg.path("tokenizer")
    with start_run(cfg, STAGE) as tracker:
        tracker.log_params({"seed": cfg.seed, STAGE: dataclasses.asdict(cfg.tokenizer)})
        with atomic_dir(out_dir) as out:
            meta = tokenize_into(cfg, out, {s: ParquetTexts(p) for s, p in inputs.items()})
        report = build_report(meta)
        report_path = atomic_write_json(cfg.path("reports") / report_json(STAGE), report)
        tracker.set_tags({"lmforge.train_corpus_digest": meta["train_corpus_digest"]})
        tracker.log_metrics(
            {
                "vocab_size": report["vocab_size"],
                "bytes_per_token_val": report["bytes_per_token_val"],
                **{f"tokens_{s}": e["tokens"] for s, e in report["splits"].items()},
            }
        )
        for name in (TOKENIZER_FILE, META_FILE):  # under tokenizer/: the report has
            tracker.log_artifact(out_dir / name, STAGE)  # the same file name as the BPE
        tracker.log_artifact(report_path, "reports")
        for split, path in inputs.items():
            context = SPLIT_CONTEXT[split]
            tracker.log_dataset(path, f"text-{split}", context)
            tracker.log_dataset(out_dir / shard_file(split), f"tokens-{split}", context, "output")
        tracker.describe(STAGE, report)
    return report


# `dvc repro tokenizer`; by hand `python -m pipeline.stages.tokenizer --set k=v`
main = stage_entry(STAGE, run)

if __name__ == "__main__":
    raise SystemExit(main())
