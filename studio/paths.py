"""Where the studio keeps its files: one data dir with models/, runs/ and datasets/.

The data dir is `~/.lora-studio` unless `LORA_STUDIO_HOME` or `--data-dir` says otherwise;
nothing is ever written into the repository at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "LORA_STUDIO_HOME"
_override: Path | None = None


def set_data_dir(path: str | os.PathLike[str] | None) -> Path:
    """Pin the data dir for this process (the `--data-dir` flag); None restores the default."""
    global _override
    _override = Path(path).expanduser().resolve() if path else None
    if _override is not None:
        # Child processes (the CLI run by a test, a benchmark) see the same dir.
        os.environ[ENV_VAR] = str(_override)
    return data_dir()


def data_dir() -> Path:
    """The data dir, created on first use."""
    if _override is not None:
        root = _override
    elif os.environ.get(ENV_VAR):
        root = Path(os.environ[ENV_VAR]).expanduser().resolve()
    else:
        root = Path.home() / ".lora-studio"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sub(name: str) -> Path:
    path = data_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Converted and cached base models."""
    return _sub("models")


def runs_dir() -> Path:
    """One folder per training run, never overwritten."""
    return _sub("runs")


def datasets_dir() -> Path:
    """Cleaned (redacted) copies of user datasets; originals are never touched."""
    return _sub("datasets")
