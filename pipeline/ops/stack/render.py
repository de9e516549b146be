"""Fill a config template's `${NAME}` placeholders from the environment (compose's `render`).

    python -m pipeline.ops.stack.render docker/seaweedfs/s3.json.template /rendered/s3.json

The process launcher fills the same template with the same function (layout.render_template),
so both launchers run SeaweedFS with the same identities file. The output is mode 0600.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.ops.stack.layout import StackError, render_template, write_private


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m pipeline.ops.stack.render TEMPLATE OUTPUT", file=sys.stderr)
        return 2
    try:
        write_private(Path(args[1]), render_template(Path(args[0]), dict(os.environ)))
    except (StackError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
