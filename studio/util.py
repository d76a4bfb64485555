"""Small helpers every stage uses, one copy each: an error in one line, a new file name that
never overwrites, and what a failed write means.

Foundation layer: imports nothing from studio, so any module may use it.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line, cut to `limit` characters ("" when it has no message)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


def short_error(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line for a message: "TypeName: first line"."""
    line = first_line(exc, limit)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


# --------------------------------------------------------------------------- never overwrite


def new_path(
    directory: Path,
    stem: str,
    suffix: str = "",
    *,
    stamp: str | None = None,
    create: Callable[[Path], object] | None = None,
) -> Path:
    """`<stem>-<YYYYmmdd-HHMMSS><suffix>` in `directory`, with -2, -3... when that is taken.

    Without `create`, the first name that does not exist. With it, `create(path)` claims the
    name (a `mkdir`, an exclusive open, a hard link) and must raise FileExistsError when
    something got there first; the next name is tried then, so two writers in the same
    second never share (or replace) a file.
    """
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    for i in range(1, 1000):
        path = Path(directory) / f"{stem}-{stamp}{'' if i == 1 else f'-{i}'}{suffix}"
        if create is None:
            if not path.exists():
                return path
            continue
        try:
            create(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free name for {stem}-{stamp}{suffix} in {directory}")


# --------------------------------------------------------------------------- failed writes

WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}
# torch.save, safetensors and Rust's io errors often hand these over as plain text only.
_WRITE_TEXT = (
    (errno.ENOSPC, ("no space left", "os error 28", "storagefull", "not enough space on the disk")),
    (errno.EDQUOT, ("disk quota exceeded", "os error 122")),
    (errno.EROFS, ("read-only file system", "os error 30")),
    (errno.EACCES, ("permission denied", "os error 13")),
)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its cause or context, and theirs."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write anywhere in the exception chain (ENOSPC, EDQUOT, EROFS,
    EACCES/EPERM), read from the OSError or, where a library wrapped it, from its text."""
    for seen in exception_chain(exc):
        if isinstance(seen, OSError) and seen.errno in WRITE_ERRNOS:
            return errno.EACCES if seen.errno == errno.EPERM else seen.errno
        text = str(seen).lower()
        for code, needles in _WRITE_TEXT:
            if any(n in text for n in needles):
                return code
    return None


def is_disk_full(exc: BaseException) -> bool:
    """The disk (or the user's quota on it) is full."""
    return write_errno(exc) in (errno.ENOSPC, errno.EDQUOT)
