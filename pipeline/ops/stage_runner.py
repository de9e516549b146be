"""The shared `main()` of every stage: parse `--preset`/`--set`, run, report errors clearly.

    python -m pipeline.stages.validate --set validate.min_chars=20

Exit codes: 0 success, 1 the stage rejected its input (gate failure, bad data or checkpoint),
2 bad configuration, 75 a transient failure worth retrying (e.g. the tracking server is
unreachable; the flow retries only these), or the `exit_code` of the LmforgeError raised
(143: pretrain stopped by SIGTERM after saving a checkpoint). `lmforge stage <name>` calls
the stage's `main()`, hence this function, so both ways of running a stage give one code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from pipeline.config import Config, ConfigError, load_config
from pipeline.core.errors import EXIT_TRANSIENT, LmforgeError, is_transient


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("great_expectations", "alembic", "httpx", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_main(name: str, run: Callable[[Config], dict[str, Any]], argv: list[str] | None = None):
    """Entry point for `python -m pipeline.stages.<name>`; returns the process exit code."""
    parser = argparse.ArgumentParser(prog=f"python -m pipeline.stages.{name}")
    parser.add_argument("--preset", help="apply presets/<PRESET>.yaml over params.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key of params.yaml, e.g. --set seed=7 (repeatable)",
    )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(preset=args.preset, overrides=args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg)
    except LmforgeError as e:
        print(f"error: stage {name} failed:\n{e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except Exception as e:
        if not is_transient(e):
            raise  # a bug: the traceback is what a developer needs
        print(f"error: stage {name} failed (transient, retry): {e}", file=sys.stderr)
        return EXIT_TRANSIENT
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def stage_entry(name: str, run: Callable[[Config], dict[str, Any]]) -> Callable[..., int]:
    """The `main(argv=None) -> int` of pipeline/stages/<name>.py: `stage_main(name, run, argv)`."""

    def main(argv: list[str] | None = None) -> int:
        return stage_main(name, run, argv)

    main.__doc__ = f"`dvc repro {name}`; by hand `python -m pipeline.stages.{name} --set k=v`."
    return main
