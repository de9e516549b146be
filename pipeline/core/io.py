"""Atomic file and folder writes, and content digests.

Every stage writes through these helpers so that a failed or killed run never leaves a
half-written output and never destroys the outputs of the last good run: content goes to a
temporary sibling first and is renamed into place only when complete (rename is atomic
on one filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import LmforgeError

# Why a write can fail for lack of room, by errno, and the same words as libraries that do
# not raise OSError put them in their messages (safetensors' Rust I/O errors, for one).
_NO_ROOM = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (over the file-size limit, e.g. ulimit -f)",
}
_NO_ROOM_TEXT = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "File too large": errno.EFBIG,
}


class OutputWriteError(LmforgeError):
    """An output could not be written for lack of room (disk full, quota, file-size limit).

    The message names the output and the cause; the previous output is left as it was
    and the temporary file or folder is removed (exit code 1, like other bad environments).
    """


def no_room_cause(exc: BaseException) -> str | None:
    """Why `exc` (or an exception it came from) is a lack of room; None if it is not.

    Walks `__cause__`/`__context__`: torch.save reports a failed write as a RuntimeError
    ("unexpected pos ...") raised while handling the file object's OSError(ENOSPC).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_ROOM:
            return _NO_ROOM[current.errno]
        for text, code in _NO_ROOM_TEXT.items():
            if text in str(current):
                return _NO_ROOM[code]
        current = current.__cause__ or current.__context__
    return None


def _failed_file(exc: BaseException) -> str | None:
    """The file an OSError in `exc`'s chain names, if any."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            return None
        if isinstance(current, OSError) and current.filename:
            return str(current.filename)
        current = current.__cause__ or current.__context__
    return None


def no_room_error(path: Path, exc: BaseException) -> OutputWriteError | None:
    """An OutputWriteError naming `path` if `exc` is a lack of room, else None."""
    if isinstance(exc, OutputWriteError):
        return exc
    cause = no_room_cause(exc)
    if cause is None:
        return None
    failed = _failed_file(exc)
    where = f" (writing {failed})" if failed and Path(failed) != Path(path) else ""
    return OutputWriteError(
        f"{path}: cannot write: {cause}{where}. Nothing was replaced: the previous "
        "output is unchanged and the temporary files are removed; free space on that "
        "filesystem (or raise the limit) and run the stage again"
    )


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` via a temporary sibling and an atomic rename.

    A full disk (or a file-size limit) raises OutputWriteError naming `path`; the
    temporary file is removed and the old `path` is untouched either way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if (err := no_room_error(path, e)) is not None:
            raise err from e
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    """JSON with sorted keys and a trailing newline, so identical content hashes identically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _temp_owner(name: str, target: str) -> int | None:
    """The pid in a temporary's name `.<target>.<pid>.<random>.tmp`; None if it has none."""
    middle = name[len(target) + 2 : -len(".tmp")]  # "<pid>.<random>" or, before pids, "<random>"
    pid, dot, _ = middle.partition(".")
    return int(pid) if dot and pid.isdigit() else None


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Clear what a killed writer of `path` left beside it; the paths removed or restored.

    `atomic_dir(path)` builds `.<name>.<pid>.<random>.tmp` beside `path` and swaps it in
    through `.<name>.old`. A process killed in between leaves those behind:
    - a temporary folder whose owner pid is gone (or has no pid: made before pids were in
      the name) is deleted; one whose owner is alive belongs to a running writer and is
      kept, unless the owner is this process (then it is left over from an earlier failed
      attempt in this same process, which has already cleaned up, so it cannot be live);
    - `.<name>.old` is the previous good output: if `path` itself is missing (killed between
      the two renames) it is renamed back to `path`, otherwise it is deleted.
    Assumption, enforced by the workspace lock for pipeline runs: one process writes a given
    output at a time, so nobody else is using `.<name>.old`.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    touched: list[Path] = []
    prefix = f".{path.name}."
    for entry in path.parent.iterdir():
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        owner = _temp_owner(entry.name, path.name)
        if owner is not None and owner != os.getpid() and _pid_alive(owner):
            continue  # a live writer's folder
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        touched.append(entry)
    old = path.with_name(f".{path.name}.old")
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:  # killed between the two renames: the last good output is put back
            os.replace(old, path)
        touched.append(old)
    return touched


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path`, on error it is deleted.

    The previous `path` is kept until the new one is complete, then swapped out with two
    renames (the window between them is tiny and never leaves a partial folder at `path`).
    What an earlier, killed writer left behind is cleared first (`remove_stale_temporaries`);
    the temporary's name carries this process's pid so that a live writer's is recognised.
    A full disk (or file-size limit) while writing raises OutputWriteError naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(
        tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    )
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (err := no_room_error(path, e)) is not None:
            # One line naming the output, not a library's traceback, and the file by its
            # final name (the temporary folder is gone).
            raise OutputWriteError(str(err).replace(str(tmp), str(path))) from e
        raise
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    """MD5 of a file's bytes: the digest DVC 3 records for a file output."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_md5(path: Path) -> str:
    """A content digest of a file or folder (relative paths + file md5s), stable across runs."""
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    h = hashlib.md5()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path).as_posix()}\0{file_md5(p)}\n".encode())
    return h.hexdigest()
