#!/usr/bin/env bash
# The GPU path in one run of at most ~8 minutes, everything it measures as JSON under $OUT/.
#
#   OUT=/tmp/gpu benchmarks/gpu_check.sh                 # on the GPU machine (CUDA)
#   OUT=/tmp/gpu benchmarks/gpu_check.sh --device cpu    # the same checks, tiny, on a CPU
#
# Needs only Python, torch, numpy, tokenizers, safetensors and pyyaml (no mlflow, prefect,
# dvc or Great Expectations): the token shards are generated (random tokens and a byte-level
# tokenizer.json, benchmarks/pretrain_throughput.py:make_token_dir), not made by the
# tokenizer stage.
#   1. throughput.json   nanoGPT-equivalent baseline vs lmforge's bare loop vs the pretrain
#                        stage's loop: tokens/s and MFU, GPT-2 124M at T=1024, B=16 and 32
#                        (tiny preset on CPU);
#   2. torchrun_ddp.json, torchrun_fsdp.json
#                        20 steps of `torchrun --nproc_per_node=1 -m pipeline.stages.pretrain`
#                        with strategy ddp and fsdp: exit code, report, wall time;
#   3. resume.json       pretrain.deterministic=true: an interrupted run resumed from its
#                        checkpoint gives the same losses and weights, bit for bit, as a
#                        straight run.
#   summary.json         each part's exit code and wall seconds.
# Each part has its own time limit; a part that fails is recorded and the others still run.
set -uo pipefail

DEVICE=cuda
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        *) echo "usage: $0 [--device cuda|cpu]" >&2; exit 2 ;;
    esac
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_check_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

if [[ "$DEVICE" == cuda ]]; then
    BENCH=(--preset gpt2-124m --batch 16 32 --steps 20 --warmup 10)
    BENCH_LIMIT=330
    # The `tiny` model preset (pipeline.model.gpt.PRESETS): ~1M parameters.
    MODEL=(model.n_layer=4 model.n_head=4 model.n_embd=128 model.block_size=128)
    VOCAB=2048; MICRO=16; STAGE_LIMIT=150
else
    BENCH=(--preset tiny --batch 4 --steps 4 --warmup 2)
    BENCH_LIMIT=600
    MODEL=(model.n_layer=2 model.n_head=2 model.n_embd=32 model.block_size=32)
    VOCAB=512; MICRO=4; STAGE_LIMIT=400
fi
TOKENS_PER_STEP=$((MICRO * ${MODEL[3]#model.block_size=}))

declare -A RC WALL
part() {  # part NAME LIMIT_S CMD...: run with a time limit, record exit code and wall time
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --signal=TERM --kill-after=15 "$limit" "$@"
    RC[$name]=$?
    WALL[$name]=$((SECONDS - t0))
    echo "== $name: exit ${RC[$name]} after ${WALL[$name]}s"
}

# A project root for the stage: the repo's params.yaml, generated shards, tracking off.
"$PY" - "$WORK" "$VOCAB" <<'EOF'
import sys
from pathlib import Path
import yaml
from benchmarks.pretrain_throughput import REPO, make_token_dir

work, vocab = Path(sys.argv[1]), int(sys.argv[2])
make_token_dir(work / "tok", vocab, tokens=400_000)
params = yaml.safe_load((REPO / "params.yaml").read_text())
params["paths"] |= {"tokenizer": str(work / "tok")}
params["tracking"]["enabled"] = False
(work / "params.yaml").write_text(yaml.safe_dump(params))
EOF

COMMON=("${MODEL[@]}" "pretrain.device=$DEVICE" "pretrain.micro_batch_size=$MICRO"
        "pretrain.tokens_per_step=$TOKENS_PER_STEP" pretrain.max_steps=20 pretrain.warmup_steps=5
        pretrain.log_interval=5 pretrain.eval_interval=10 pretrain.eval_batches=2
        pretrain.checkpoint_interval=10 model.dropout=0.1)
sets() { for s in "$@"; do printf -- '--set\n%s\n' "$s"; done; }

# 1. Side-by-side throughput.
part throughput "$BENCH_LIMIT" "$PY" "$REPO/benchmarks/pretrain_throughput.py" \
    --device "$DEVICE" "${BENCH[@]}" --out "$OUT/throughput.json"

# 2. One-process DDP and FSDP2 through torchrun.
for strategy in ddp fsdp; do
    mapfile -t ARGS < <(sets "${COMMON[@]}" "pretrain.strategy=$strategy" \
        "paths.pretrain=$WORK/$strategy/model" "paths.checkpoints=$WORK/$strategy/ckpt" \
        "paths.reports=$WORK/$strategy/reports")
    pushd "$WORK" > /dev/null
    part "torchrun_$strategy" "$STAGE_LIMIT" "$PY" -m torch.distributed.run --standalone \
        --nproc_per_node=1 -m pipeline.stages.pretrain "${ARGS[@]}" \
        > "$OUT/torchrun_$strategy.log" 2>&1
    popd > /dev/null
    "$PY" - "$WORK/$strategy/reports/pretrain.json" "$OUT/torchrun_$strategy.json" \
        "${RC[torchrun_$strategy]}" "${WALL[torchrun_$strategy]}" <<'EOF'
import json, sys
from pathlib import Path
report, out, rc, wall = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = {"exit_code": rc, "wall_seconds": wall,
        "report": json.loads(report.read_text()) if report.is_file() else None}
out.write_text(json.dumps(data, indent=2))
EOF
done

# 3. Resume bit-identity in deterministic mode.
mapfile -t RESUME_SETS < <(printf '%s\n' "${COMMON[@]}" pretrain.deterministic=true)
part resume "$STAGE_LIMIT" "$PY" - "$WORK" "$OUT/resume.json" "${RESUME_SETS[@]}" <<'EOF'
"""A straight run vs. one killed at step 15 (after the step-10 checkpoint) and resumed."""
import json, sys
from pathlib import Path
from pipeline.config import load_config
from pipeline.core.io import file_md5
from pipeline.stages import pretrain
from pipeline.train import loop

work, out, sets = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]

def cfg(name):
    paths = [f"paths.{k}={work}/resume_{name}/{k}" for k in ("pretrain", "checkpoints", "reports")]
    return load_config(work, overrides=[*sets, *paths])

def curve(c):
    return [r["loss"] for r in json.loads((c.path("reports") / "plots" / "pretrain_loss.json").read_text())]

straight, crashed = cfg("straight"), cfg("crashed")
pretrain.run(straight)
real = loop.Trainer.train_step
def crash_at_15(self, micro, step):
    if step == 15:
        raise KeyboardInterrupt  # like a kill: no checkpoint at the crash
    return real(self, micro, step)
loop.Trainer.train_step = crash_at_15
try:
    pretrain.run(crashed)
except KeyboardInterrupt:
    pass
loop.Trainer.train_step = real
pretrain.run(crashed)  # resumes from step 10
a, b = curve(straight), curve(crashed)
md5 = [file_md5(c.path("pretrain") / "model.safetensors") for c in (straight, crashed)]
result = {"losses_identical": a == b, "weights_identical": md5[0] == md5[1],
          "losses_straight": a, "losses_resumed": b, "weights_md5": md5,
          "report": json.loads((straight.path("reports") / "pretrain.json").read_text())}
out.write_text(json.dumps(result, indent=2))
print(json.dumps({k: result[k] for k in ("losses_identical", "weights_identical")}))
sys.exit(0 if result["losses_identical"] and result["weights_identical"] else 1)
EOF

"$PY" - "$OUT/summary.json" "$DEVICE" \
    "throughput=${RC[throughput]}:${WALL[throughput]}" \
    "torchrun_ddp=${RC[torchrun_ddp]}:${WALL[torchrun_ddp]}" \
    "torchrun_fsdp=${RC[torchrun_fsdp]}:${WALL[torchrun_fsdp]}" \
    "resume=${RC[resume]}:${WALL[resume]}" <<'EOF'
import json, sys
import torch
parts = {}
for item in sys.argv[3:]:
    name, value = item.split("=")
    rc, wall = value.split(":")
    parts[name] = {"exit_code": int(rc), "wall_seconds": int(wall)}
device = torch.cuda.get_device_name(0) if sys.argv[2] == "cuda" else "cpu"
summary = {"device": device, "torch": torch.__version__, "parts": parts,
           "ok": all(p["exit_code"] == 0 for p in parts.values())}
open(sys.argv[1], "w").write(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
for name in throughput torchrun_ddp torchrun_fsdp resume; do
    [[ "${RC[$name]}" == 0 ]] || exit 1
done
