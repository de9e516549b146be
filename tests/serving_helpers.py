"""Real servers for tests: `mlflow models serve`, `mlflow server`, and a tiny model package.

Every server is a real process on a free loopback port; every wait is bounded; `stop` ends a
process by its pid (SIGTERM, then SIGKILL when it does not exit in time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch

from pipeline.model.gpt import GPT, GPTConfig, padded_vocab
from pipeline.serve.publish import log_model
from pipeline.serve.textgen import DEFAULTS_FILE, GenerationParams
from pipeline.text.tokenizer import EOT, train_bpe
from pipeline.train import checkpoint as ckpt

BIN = Path(sys.executable).parent  # the venv's bin: `mlflow`, and the `uvicorn` it starts
START_TIMEOUT_S = 120.0  # a cold `mlflow server` runs its migrations first (~2-7 s on 2 cores)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    """The environment of a server process: ours, with the venv's bin first on PATH."""
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **extra}


def start(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start `cmd` with stdout and stderr to `log_path`, in its own process group."""
    log = log_path.open("ab")
    try:
        return subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        log.close()  # the child holds its own copy of the descriptor


def wait_until_up(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    """Poll `url` until it answers, failing with the log if the process exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                pytest.fail(f"server did not start ({url}):\n{log_path.read_text()[-4000:]}")
            time.sleep(0.3)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Send `sig` to the process group of `proc` (by pid); SIGKILL it if it outlives `timeout`.

    `mlflow server` and `mlflow models serve` start uvicorn/gunicorn children: the group
    takes them down too, so no orphan keeps the port.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):  # children that ignored it
        os.killpg(proc.pid, signal.SIGKILL)


def start_tracking_server(
    db: Path, artifacts: Path, log_path: Path, port: int | None = None
) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on a SQLite file; (process, its http:// tracking URI)."""
    port = port or free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(artifacts)]
    cmd += ["--workers", "1"]
    proc = start(cmd, log_path, server_env())
    uri = f"http://127.0.0.1:{port}"
    wait_until_up(proc, f"{uri}/health", log_path)
    return proc, uri


def serve_model(model_uri: str, tracking_uri: str, log_path: Path) -> tuple[subprocess.Popen, int]:
    """A real `mlflow models serve` of `model_uri` (offline: --env-manager local); its port."""
    port = free_port()
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "-p", str(port)]
    proc = start(cmd, log_path, server_env(MLFLOW_TRACKING_URI=tracking_uri))
    wait_until_up(proc, f"http://127.0.0.1:{port}/ping", log_path)
    return proc, port


def post(
    port: int, body: Any, content_type: str | None = "application/json", raw: bytes | None = None
) -> tuple[int, Any]:
    """POST to /invocations; (HTTP status, the answer parsed as JSON or else as text).

    `raw` is sent as the body instead of `body` as JSON; `content_type=None` sends no
    Content-Type header at all (http.client adds none of its own).
    """
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/invocations", body=data, headers=headers)
        resp = conn.getresponse()
        status, text = resp.status, resp.read().decode("utf-8", errors="replace")
    finally:
        conn.close()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def predictions(port: int, body: dict) -> list[str]:
    """The predictions of a request that must succeed."""
    status, answer = post(port, body)
    assert status == 200, answer
    return answer["predictions"]


TINY_TEXTS = [
    "tom went to the park. he saw a dog.",
    "lucy found a red ball in the garden.",
    "the dog ran to the park with tom.",
] * 20


def tiny_package(dest: Path, defaults: dict[str, Any] | None = None) -> Path:
    """A model package (pipeline/serve/textgen.py) with a random tiny GPT: no pipeline run needed.

    block_size 32, so max_new_tokens > 32 is out of this model's range.
    """
    dest.mkdir(parents=True)
    tok = train_bpe(TINY_TEXTS, vocab_size=300, special_tokens=[EOT], min_frequency=2)
    tok.save(str(dest / "tokenizer.json"))
    gcfg = GPTConfig(
        vocab_size=padded_vocab(tok.get_vocab_size()), block_size=32, n_layer=1, n_head=2, n_embd=16
    )
    torch.manual_seed(0)
    model = GPT(gcfg)
    ckpt.save_weights(dest / "model.safetensors", model.state_dict())
    (dest / "model_config.json").write_text(json.dumps(dataclasses.asdict(gcfg)))
    values = {"max_new_tokens": 6, **(defaults or {})}
    gp = dataclasses.asdict(GenerationParams.from_mapping(values))
    (dest / DEFAULTS_FILE).write_text(json.dumps(gp))
    return dest


@contextlib.contextmanager
def served_tiny_model(root: Path) -> Iterator[tuple[subprocess.Popen, int, Path]]:
    """(server process, port, model package) of `tiny_package` logged and served under `root`.

    The model is logged by the register stage's own `log_model` into a SQLite store, then
    served by a real `mlflow models serve`, stopped (by its process group) on exit.
    """
    uri = f"sqlite:///{root / 'mlflow.db'}"
    package = tiny_package(root / "package")
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("serving", str(root / "artifacts")))
    model_uri = log_model(uri, run.info.run_id, package)
    server, port = serve_model(model_uri, uri, root / "serve.log")
    try:
        yield server, port, package
    finally:
        stop(server)
