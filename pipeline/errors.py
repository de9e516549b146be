"""User-facing errors: bad data, params, paths or checkpoints.

Stage entry points catch these and print the message alone (no traceback) with a non-zero
exit, because the message already names the file or key and what was expected.
"""

from __future__ import annotations


class LmforgeError(Exception):
    """Base class of errors whose message is the whole story for the user."""


class GateFailed(LmforgeError):
    """A quality gate (Great Expectations, drift, contamination) rejected the data."""
