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
