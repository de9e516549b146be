"""Seeds derived from the one master seed in params.yaml.

Each consumer gets its own stream, named by a path of labels, so adding a new consumer never
shifts the random numbers another one sees (which would silently change its outputs).
"""

from __future__ import annotations

import hashlib


def derive_seed(master: int, *labels: str) -> int:
    """A 63-bit seed for the stream `labels` under `master`; stable across runs and machines."""
    text = "/".join([str(master), *labels]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1
