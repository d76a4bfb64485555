"""What every export stage shares: the error type, progress.

Kept apart so merge, gguf and ollama need nothing from `run` (which calls them).
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, float], None]
Message = dict[str, str]


class ExportError(RuntimeError):
    """The export failed; the message says what went wrong and what to do. Nothing was left."""


def noop(_msg: str, _frac: float) -> None:
    """A progress callback that reports nowhere."""


def short_error(exc: BaseException) -> str:
    """An exception as one short line for an ExportError message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}"
