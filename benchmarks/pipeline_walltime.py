"""Wall time of the whole pipeline on a preset, then of a second run with nothing changed.

    .venv/bin/python benchmarks/pipeline_walltime.py --preset default

Clones this repository (HEAD) into a temporary folder, points its DVC remote at a
temporary folder too, and runs `lmforge run --preset P` twice with this interpreter's
environment: the first run trains everything, the second must skip every stage. Prints
both wall times (Prefect start-up included) and each stage's seconds from the summary.
Targets (issue 6): the `default` preset in <= 15 minutes on 2 CPU cores after set-up; a
second run with nothing changed in <= 30 s.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_run(work: Path, preset: str, env: dict[str, str]) -> tuple[float, str]:
    lmforge = Path(sys.executable).parent / "lmforge"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(lmforge), "run", "--preset", preset], cwd=work, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"lmforge run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def stage_lines(output: str) -> list[str]:
    """The flow's closing per-stage lines: '<stage> ran|skipped ... <seconds>s'."""
    pattern = re.compile(r"- (\w+)\s+(ran|skipped \(unchanged\))\s+([\d.]+)s")
    return [f"  {m[0]:<11} {m[1]:<20} {m[2]:>7} s" for m in pattern.findall(output)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmforge-walltime-") as tmp:
        work, remote = Path(tmp) / "repo", Path(tmp) / "remote"
        subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        env.pop("MLFLOW_TRACKING_URI", None)
        subprocess.run(
            ["dvc", "remote", "modify", "--local", "local", "url", str(remote)],
            cwd=work,
            env=env,
            check=True,
        )
        first, out1 = timed_run(work, args.preset, env)
        print(f"first run  (preset {args.preset}): {first / 60:.1f} min ({first:.0f} s)")
        print("\n".join(stage_lines(out1)))
        second, out2 = timed_run(work, args.preset, env)
        print(f"second run (nothing changed):  {second:.1f} s")
        skipped = sum("skipped" in line for line in stage_lines(out2))
        print(f"  stages skipped: {skipped}/{len(stage_lines(out2))}")


if __name__ == "__main__":
    main()
