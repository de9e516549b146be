"""Load on the served model: N concurrent clients for a bounded time, over loopback only.

    .venv/bin/python benchmarks/serve_load.py                     # the champion; 1, 4, 16 clients
    .venv/bin/python benchmarks/serve_load.py --model-uri models:/lmforge-gpt/2 --duration 30
    .venv/bin/python benchmarks/serve_load.py --clients 1 8 --max-new-tokens 32 --out load.json

The model: `--model-uri`, else `models:/<register.model_name>@champion` in the project's
tracking store (there after `make run`), else a model package built here with the `ci`
preset's architecture and tokenizer size (random weights; a BPE tokenizer trained on a few
story sentences), logged by the register stage's own `log_model` into a temporary MLflow
store. It is served by a real `mlflow models serve --env-manager local` on a free
127.0.0.1 port, in its own process group, stopped when the benchmark ends.

After `--warmup` seconds of requests (not counted), for each client count N: N threads,
each with its own keep-alive connection, send the same greedy request back to back for
`--duration` seconds (after one more warm-up request each).
Printed per N: requests/s (completed requests / wall time), latency p50/p95/p99 (nearest
rank, over every completed request) and the error count (a status other than 200, or a
failed connection). A random model may stop early at its end-of-text token; the printed
mean characters per answer shows how much text a request produced.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from local_http import answers, free_port  # benchmarks/: the script's folder

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JSON = "application/json"
PROMPT = "once upon a time tom went to the park and"
STORY = [
    "tom went to the park. he saw a dog.",
    "lucy found a red ball in the garden.",
    "the dog ran to the park with tom and lucy.",
    "once upon a time a cat sat on the warm mat.",
]


@dataclasses.dataclass
class Level:
    """What N clients achieved in one bounded window."""

    clients: int
    seconds: float
    latencies_s: list[float]
    errors: int
    chars: int

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the latencies, in seconds (nan when none completed)."""
        if not self.latencies_s:
            return math.nan
        ranked = sorted(self.latencies_s)
        return ranked[max(0, math.ceil(q / 100 * len(ranked)) - 1)]

    def row(self) -> dict[str, float]:
        n = len(self.latencies_s)
        return {
            "clients": self.clients,
            "requests": n,
            "requests_per_s": n / self.seconds,
            "p50_ms": 1000 * self.percentile(50),
            "p95_ms": 1000 * self.percentile(95),
            "p99_ms": 1000 * self.percentile(99),
            "errors": self.errors,
            "mean_chars": self.chars / n if n else 0.0,
        }


def champion_uri(tracking: str, name: str) -> str | None:
    """models:/<name>@champion when the store has one; None when it has none (not an error).

    A SQLite store that does not exist yet has none (and is not created by asking).
    """
    import mlflow

    if tracking.startswith("sqlite:///") and not Path(tracking[len("sqlite:///") :]).is_file():
        return None

    from pipeline.serve.registry import version_by_alias  # raises RegistryError on a bad store

    found = version_by_alias(mlflow.MlflowClient(tracking), name, "champion")
    return f"models:/{name}@champion" if found is not None else None


def texts(n: int = 3000) -> list[str]:
    """Story sentences and made-up words (seeded): enough pairs for a full ci-size BPE."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 8))) for _ in range(400)]
    return [f"{rng.choice(STORY)} {' '.join(rng.choices(words, k=8))}." for _ in range(n)]


def build_ci_model(root: Path) -> tuple[str, str]:
    """(tracking URI, model URI) of a random model of the `ci` preset's shape, logged under root."""
    import mlflow
    import torch

    from pipeline.config import load_config
    from pipeline.model.gpt import GPT, GPTConfig
    from pipeline.serve.publish import log_model
    from pipeline.serve.textgen import DEFAULTS_FILE, GenerationParams
    from pipeline.text.tokenizer import EOT, train_bpe
    from pipeline.train import checkpoint as ckpt

    cfg = load_config(REPO, preset="ci")
    package = root / "package"
    package.mkdir(parents=True)
    tok = train_bpe(
        texts(), vocab_size=cfg.tokenizer.vocab_size, special_tokens=[EOT], min_frequency=2
    )
    tok.save(str(package / "tokenizer.json"))
    gcfg = GPTConfig.from_params(cfg.model, tok.get_vocab_size())
    torch.manual_seed(0)
    ckpt.save_weights(package / "model.safetensors", GPT(gcfg).state_dict())
    (package / "model_config.json").write_text(json.dumps(dataclasses.asdict(gcfg)))
    values = {"max_new_tokens": cfg.model.block_size // 2}
    defaults = dataclasses.asdict(GenerationParams.from_mapping(values))
    (package / DEFAULTS_FILE).write_text(json.dumps(defaults))
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking)
    run = client.create_run(client.create_experiment("serve-load", str(root / "artifacts")))
    return tracking, log_model(tracking, run.info.run_id, package)


@contextlib.contextmanager
def served(model_uri: str, tracking: str, workers: int, log: Path) -> Iterator[int]:
    """A real `mlflow models serve` of `model_uri` on a free loopback port; yields the port."""
    port = free_port()
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": tracking}
    with log.open("ab") as out:
        # its own session: one process group, so uvicorn's children stop with it
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 180  # a cold start on 2 busy cores: tens of seconds
        while not answers(port, "/ping"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start; its log:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def client_loop(port: int, body: bytes, stop_at: float, out: Level, lock: threading.Lock) -> None:
    """Send `body` back to back until `stop_at` on one keep-alive connection; record each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": JSON}
    lat, errors, chars = [], 0, 0
    while time.monotonic() < stop_at:
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/invocations", body=body, headers=headers)
            resp = conn.getresponse()
            answer = resp.read()
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            continue
        if resp.status != 200:
            errors += 1
            continue
        lat.append(time.perf_counter() - t0)
        chars += sum(len(t) for t in json.loads(answer)["predictions"])
    conn.close()
    with lock:
        out.latencies_s += lat
        out.errors += errors
        out.chars += chars


def run_level(port: int, body: bytes, clients: int, duration: float) -> Level:
    """`clients` threads for `duration` seconds, after `clients` warm-up requests (not counted)."""
    for _ in range(clients):  # warm-up: the first requests pay for lazy imports and caches
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/invocations", body=body, headers={"Content-Type": JSON})
        conn.getresponse().read()
        conn.close()
    level, lock = Level(clients, duration, [], 0, 0), threading.Lock()
    start = time.monotonic()
    stop_at = start + duration
    threads = [
        threading.Thread(target=client_loop, args=(port, body, stop_at, level, lock))
        for _ in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    level.seconds = time.monotonic() - start  # includes the requests in flight at stop_at
    return level


def measure(args: argparse.Namespace, tmp: Path) -> tuple[str, list[dict[str, float]]]:
    """(model URI, one row per client count): serve the model, then every level in turn."""
    from pipeline.config import load_config
    from pipeline.ops.tracking import tracking_uri

    cfg = load_config(REPO)
    tracking = tracking_uri(cfg)
    model_uri = args.model_uri or champion_uri(tracking, cfg.register.model_name)
    if model_uri is None:
        print("no champion registered: serving a random model of the ci preset's shape")
        tracking, model_uri = build_ci_model(tmp)
    request = {"inputs": [PROMPT], "params": {"max_new_tokens": args.max_new_tokens}}
    body = json.dumps(request).encode()
    print(f"model {model_uri}, {args.workers} worker(s), {args.duration:g} s per level")
    rows = []
    with served(model_uri, tracking, args.workers, tmp / "serve.log") as port:
        run_level(port, body, 1, args.warmup)  # lazy imports, allocator, caches: not counted
        for n in args.clients:
            rows.append(r := run_level(port, body, n, args.duration).row())
            print(
                f"clients {n:>3}: {r['requests_per_s']:7.2f} req/s  p50 {r['p50_ms']:7.1f} ms"
                f"  p95 {r['p95_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}"
                f"  ({r['requests']} requests, {r['mean_chars']:.0f} chars each)"
            )
    return model_uri, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-uri", help="default: the champion, else a ci-preset random model")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per client count")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of requests first")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1, help="uvicorn workers (MLflow's default)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmforge-serve-load-") as tmp:
        model_uri, rows = measure(args, Path(tmp))
    if args.out:
        args.out.write_text(json.dumps({"model_uri": model_uri, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
