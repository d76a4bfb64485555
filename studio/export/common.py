"""What every export stage shares: the run being exported, the error type, progress.

Kept apart so merge, gguf and ollama need nothing from `run` (which calls them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Progress = Callable[[str, float], None]
Message = dict[str, str]


class ExportError(RuntimeError):
    """The export failed; the message says what went wrong and what to do. Nothing was left."""


@dataclass
class RunSource:
    """What an export needs to know about a run folder."""

    run_dir: Path
    adapter_dir: Path
    name: str
    metadata: dict[str, Any]
    settings: dict[str, Any]
    base_model: str
    base_model_path: str | None
    method: str
    trust_remote_code: bool


def noop(_msg: str, _frac: float) -> None:
    """A progress callback that reports nowhere."""
