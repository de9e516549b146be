"""The stack's files without starting a server: credentials kept across `up`s, private files,
strict env-file and template parsing, and clear errors when there is no stack."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from stack_helpers import REPO, clean_env, lmforge

from pipeline.ops.stack.layout import (
    S3_TEMPLATE,
    SERVER_SECRETS,
    Layout,
    Ports,
    StackError,
    client_settings,
    env_file_text,
    load_server_secrets,
    read_env_file,
    render_template,
    write_private,
)


def test_secrets_are_generated_once_and_kept(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    first = load_server_secrets(layout, None)
    assert set(SERVER_SECRETS) <= set(first) and first["LMFORGE_STACK_PORT_BASE"] == "15400"
    assert len({first[k] for k in SERVER_SECRETS}) == len(SERVER_SECRETS)  # all distinct
    again = load_server_secrets(layout, None)
    assert again == first  # the MLflow admin password must survive `down` + `up`
    moved = load_server_secrets(layout, 20000)
    assert moved["LMFORGE_STACK_PORT_BASE"] == "20000"
    assert {k: moved[k] for k in SERVER_SECRETS} == {k: first[k] for k in SERVER_SECRETS}
    assert layout.server_env.stat().st_mode & 0o777 == 0o600
    with pytest.raises(StackError, match="port base 99 out of range"):
        load_server_secrets(layout, 99)


def test_client_env_file_is_private_and_sourced_by_a_shell(tmp_path: Path) -> None:
    secret = load_server_secrets(Layout(tmp_path), 16000)
    values = client_settings(secret, Ports(16000))
    assert values["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:16001"
    assert values["PREFECT_API_URL"] == "http://127.0.0.1:16002/api"
    assert values["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:16003"
    path = tmp_path / "stack.env"
    values["ODD"] = "a b'c$HOME"  # quoting survives both readers
    write_private(path, env_file_text(values, "header\nsecond line"))
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_env_file(path) == values
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    script = f"source {shlex.quote(str(path))} && python3 -c {shlex.quote(dump)}"
    shell = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=True,
        env={"PATH": os.environ["PATH"]},
    )  # fmt: skip
    exported = json.loads(shell.stdout)
    assert {k: exported[k] for k in values} == values


def test_bad_env_line_and_missing_placeholder_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("# fine\nA=1\nnot a pair\n")
    with pytest.raises(StackError, match=r"bad\.env:3: expected KEY=VALUE"):
        read_env_file(bad)
    missing = r"s3\.json\.template: no value for placeholder \$\{S3_SECRET_KEY\}"
    with pytest.raises(StackError, match=missing):
        render_template(S3_TEMPLATE, {"S3_ACCESS_KEY": "k"})
    rendered = json.loads(
        render_template(S3_TEMPLATE, {"S3_ACCESS_KEY": "k", "S3_SECRET_KEY": "s"})
    )
    (identity,) = rendered["identities"]
    assert identity["credentials"] == [{"accessKey": "k", "secretKey": "s"}]


def test_stack_commands_without_a_stack_fail_clearly(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    done = lmforge(root, "--stack", "config", "show", env=clean_env())
    assert done.returncode == 2
    assert "stack.env not found: start the stack with `lmforge stack up` first" in done.stderr
    status = lmforge(root, "stack", "status", env=clean_env())
    assert status.returncode == 1 and "no stack here" in status.stderr
    down = lmforge(root, "stack", "down", env=clean_env())
    assert down.returncode == 0 and "no stack process was running" in down.stdout


def test_render_module_fills_the_template_from_the_environment(tmp_path: Path) -> None:
    out = tmp_path / "rendered" / "s3.json"
    env = clean_env() | {"S3_ACCESS_KEY": "ak", "S3_SECRET_KEY": "sk"}
    argv = [sys.executable, "-m", "pipeline.ops.stack.render", str(S3_TEMPLATE), str(out)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["identities"][0]["credentials"][0]["secretKey"] == "sk"
    assert out.stat().st_mode & 0o777 == 0o600
    missing = subprocess.run(argv, env=clean_env(), capture_output=True, text=True, check=False)
    assert missing.returncode == 1 and "S3_ACCESS_KEY" in missing.stderr
