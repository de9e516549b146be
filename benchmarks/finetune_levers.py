"""Fine-tuning levers on a finished run's pretrained model: task skill vs valid stories.

    .venv/bin/python benchmarks/finetune_levers.py            # after `make run`, in the project
    .venv/bin/python benchmarks/finetune_levers.py --prompts 50 --only "params.yaml"
    .venv/bin/python benchmarks/finetune_levers.py --set paths.pretrain=/tmp/other/model

Issue 15 found that fine-tuning on the question-answer set is what makes the shipped
model's stories invalid: the pretrained model's greedy stories are valid, the fine-tuned
model learns to copy the place from the context, which the grammar forbids. Each row here
fine-tunes a fresh copy of `paths.pretrain` with the stage's own loop
(`pipeline.train.finetune.train_method`, `finetune.method` from params.yaml, the same
batches in the same order) with the `finetune.*` settings of the row changed, then scores it:

- task accuracy and held-out answer loss, the stage's own `score`;
- validity / repetition-4 of evaluate's own decoding (`decode_all`, `generation_quality`)
  on evaluate's prompts, seed and budget rule: greedy, beam, temperature, top-k, top-p.

The first row is the pretrained model without fine-tuning, the second params.yaml as it is;
the rest name every setting they change from params.yaml (the tables in benchmarks/README.md
were measured at replay 3.0, so the rows that vary another lever pin it). Nothing the
pipeline wrote is touched: no model, report or MLflow run is written. Decoding runs on the
CPU, as in evaluate. Needs a story-world corpus (validity is the grammar's check). Not a
test: it prints a table for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from decoding_levers import story_config  # noqa: E402  benchmarks/: the script's folder

from pipeline.config import Config  # noqa: E402
from pipeline.core.io import atomic_write_json  # noqa: E402
from pipeline.core.names import TOKENIZER_FILE  # noqa: E402
from pipeline.core.seeding import derive_seed  # noqa: E402
from pipeline.data.eval_inputs import prompts_and_references  # noqa: E402
from pipeline.eval.decoding import decode_all, generation_quality  # noqa: E402
from pipeline.model.gpt import GPT  # noqa: E402
from pipeline.text.shards import read_meta  # noqa: E402
from pipeline.text.tokenizer import load_tokenizer  # noqa: E402
from pipeline.train.finetune import (  # noqa: E402
    finetune_device,
    load_data,
    load_pretrained,
    train_method,
)

# (name, finetune.* changes from params.yaml); None = no fine-tuning.
LEVERS: list[tuple[str, dict | None]] = [
    ("pretrained, no fine-tuning", None),
    ("params.yaml", {}),
    *((f"replay {r}", {"replay": r}) for r in (3.0, 6.0, 10.0, 15.0, 20.0, 30.0)),
    ("75 steps, replay 3.0", {"max_steps": 75, "replay": 3.0}),
    ("SWA from 25%, replay 3.0", {"swa_start": 0.25, "replay": 3.0}),
    ("lr 5e-4, replay 6.0", {"lr": 5e-4, "replay": 6.0}),
    ("lr 2e-3, replay 10.0", {"lr": 2e-3, "replay": 10.0}),
    ("lr 2e-3, replay 20.0", {"lr": 2e-3, "replay": 20.0}),
]
STRATEGIES = ("greedy", "beam", "temperature", "top_k", "top_p")


def finetuned(cfg: Config, change: dict | None) -> tuple[GPT, dict[str, float]]:
    """The pretrained model, fine-tuned with `change` over params.yaml (None: as pretrained),
    and its task scores (the stage's own), in eval mode on the CPU for decoding."""
    lever = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, **(change or {})))
    device = finetune_device(lever)
    gcfg, weights = load_pretrained(lever)
    data = load_data(lever, gcfg, device)
    if change is None:
        model = GPT(gcfg).to(device)
        model.load_state_dict(weights)
    else:
        model = train_method(lever.finetune.method, lever, gcfg, weights, data, device)
    task = data.score(model)  # may leave the model in train mode (corpus data)
    return model.eval().cpu(), task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project folder")
    parser.add_argument("--prompts", type=int, default=None, help="default: evaluate.prompts")
    parser.add_argument("--only", action="append", default=None, help="run this row (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--set", action="append", default=[], help="a params.yaml override k=v")
    args = parser.parse_args()
    cfg, is_valid = story_config(args.root, args.set, args.prompts, "finetune_levers")
    unknown = set(args.only or []) - {name for name, _ in LEVERS}
    if unknown:
        raise SystemExit(f"finetune_levers: no row named {sorted(unknown)}")
    tok_dir = cfg.path("tokenizer")
    tok, eot = load_tokenizer(tok_dir / TOKENIZER_FILE), read_meta(tok_dir)["eot_id"]
    prompts, refs = prompts_and_references(cfg)
    seed = derive_seed(cfg.seed, "evaluate", "decode") % 2**31  # evaluate's decoding seed
    f = cfg.finetune
    print(f"{len(prompts)} prompts, from {cfg.path('pretrain')}; params.yaml: {f.method},")
    print(f"  {f.max_steps} steps, lr {f.lr}, replay {f.replay}, swa_start {f.swa_start}")
    rows = []
    for name, change in LEVERS:
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        model, task = finetuned(cfg, change)
        train_s = time.perf_counter() - t0
        gens = decode_all(model, tok, eot, prompts, cfg, seed)
        quality = generation_quality(gens, refs, is_valid)
        row = {"lever": name, "change": change, "train_seconds": train_s, **task}
        rows.append({**row, "quality": quality})
        acc, loss = f"{task['task_accuracy']:.3f}", f"{task['answer_loss']:.3f}"
        cells = "  ".join(
            f"{s} {quality[s]['validity_rate']:.2f}/{quality[s]['repetition_4']:.2f}"
            for s in STRATEGIES
            if s in quality
        )
        print(
            f"{name:28s} acc {acc} loss {loss}  validity/repetition-4: {cells}"
            f"  ({train_s:.0f} s fine-tuning)",
            flush=True,
        )
    if args.out:
        atomic_write_json(args.out, {"prompts": len(prompts), "rows": rows})


if __name__ == "__main__":
    main()
