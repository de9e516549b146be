"""Run the venv's `dvc` in a throwaway project, offline and isolated from the user's HOME."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def dvc(root: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    """`dvc <args>` in `root` with this interpreter's venv on PATH; `extra_env` is added."""
    env_bin = str(Path(sys.executable).parent)
    env = {"PATH": f"{env_bin}:/usr/bin:/bin", "DVC_NO_ANALYTICS": "1", "HOME": str(root)}
    return subprocess.run(
        [f"{env_bin}/dvc", *args],
        cwd=root,
        capture_output=True,
        text=True,
        env={**env, **extra_env},
    )
