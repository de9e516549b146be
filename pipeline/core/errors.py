"""User-facing errors: bad data, params, paths or checkpoints.

Stage entry points catch these and print the message alone (no traceback) with a non-zero
exit, because the message already names the file or key and what was expected.
"""

from __future__ import annotations


class LmforgeError(Exception):
    """Base class of errors whose message is the whole story for the user."""


class GateFailed(LmforgeError):
    """A quality gate (Great Expectations, drift, contamination) rejected the data."""


# Exit code of a stage that failed for a reason worth retrying (EX_TEMPFAIL of sysexits.h).
EXIT_TRANSIENT = 75

# Messages of errors that come and go: a tracking server restarting, a network hiccup.
# MLflow wraps connection failures in MlflowException, so the message is all there is.
_TRANSIENT_MARKERS = (
    "Max retries exceeded",
    "Connection refused",
    "Connection reset",
    "Temporary failure in name resolution",
    "timed out",
    "503 Service Unavailable",
    "502 Bad Gateway",
    "database is locked",
)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a transient infrastructure error.

    Bad data, params and gate failures are never transient: retrying cannot fix them.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, LmforgeError):
            return False
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        if any(marker in str(current) for marker in _TRANSIENT_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False
