"""GPU memory around a run in the app's process: given back when it ends, and a fatal CUDA
error kept from breaking the next GPU use obscurely.

Training runs in a background thread of the app (`studio.train.jobs`), with explicit cleanup
here, rather than in a child process: Start reaches the first step without a second Python
importing torch and loading the model again, Stop and progress stay plain Python calls, and
the token cache and Chat's hand-over need no messages between processes. The price is that
what a run leaves behind stays in the app, so a run's end, whatever it is, goes through
`after_run`:
- bitsandbytes' paged optimizers (`paged_adamw_8bit`, every GPU preset) register each state
  buffer in a process-wide list (`GlobalPageManager.paged_tensors`) that nothing empties: the
  buffers outlived their run, tens to hundreds of MB per run and per OOM retry;
- then garbage collection and `torch.cuda.empty_cache()`, and the app's figures before and
  after the run go into its metadata.

A CUDA error other than out-of-memory (an illegal memory access, a device-side assert) leaves
the process's CUDA context unusable: every later kernel fails, Chat's included. It cannot be
repaired in-process, so the studio says "restart the studio" at once and refuses the next
GPU use with the same words (`gpu_blocker`), instead of failing obscurely.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

# Words of the CUDA errors that poison the context (torch's RuntimeError/AcceleratorError).
FATAL_MARKERS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "cuda error: an illegal",
    "cudaerrorlaunchfailure",
)
_fatal: str | None = None  # the first fatal error of this process, in words


def gpu_bytes(device: str) -> dict[str, int] | None:
    """The app's own GPU memory on the run's card (allocated and reserved), or None off CUDA."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return {
        "allocated": int(torch.cuda.memory_allocated(index)),
        "reserved": int(torch.cuda.memory_reserved(index)),
    }


def release_paged_buffers() -> int:
    """Drop bitsandbytes' process-wide references to paged optimizer buffers; how many.

    Called when no run is training (one run at a time in the app), so none is in use."""
    functional = sys.modules.get("bitsandbytes.functional")
    if functional is None:  # never imported by this process: it holds nothing
        return 0
    pages = functional.GlobalPageManager.get_instance().paged_tensors
    count = len(pages)
    pages.clear()
    return count


def after_run(device: str, before: dict[str, int] | None) -> dict[str, Any]:
    """Give back what the ended run held, and the figures for its metadata."""
    import torch

    gc.collect()
    paged = release_paged_buffers()
    gc.collect()
    if torch.cuda.is_available() and _fatal is None:  # a poisoned context cannot even free
        torch.cuda.empty_cache()
    return {
        "app_gpu_before_run": before,
        "app_gpu_after_run": gpu_bytes(device) if _fatal is None else None,
        "paged_buffers_released": paged,
    }


def is_fatal_cuda_error(exc: BaseException) -> bool:
    """An error after which this process's CUDA context is unusable (not out-of-memory)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(marker in text for marker in FATAL_MARKERS)


def mark_fatal(exc: BaseException) -> tuple[str, list[str]]:
    """Remember the fatal error for the rest of the process; the run's message and advice."""
    global _fatal
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    _fatal = _fatal or first
    message = f"Training failed with a fatal CUDA error ({first}): restart the studio."
    advice = [
        "The GPU's state in this app is broken after this error: restart the studio (close"
        " it and start it again) before training or chatting on the GPU.",
        "If it happens again with the same settings, run `python -m studio.doctor --selftest`"
        " and report the error with the run's log.",
    ]
    return message, advice


def gpu_blocker() -> str | None:
    """Why the GPU must not be used again in this process, or None."""
    if _fatal is None:
        return None
    return (
        f"An earlier run hit a fatal CUDA error ({_fatal}); the GPU cannot be used again in"
        " this session: restart the studio."
    )


def refuse_if_broken(device: str) -> None:
    """Refuse a GPU run in a process whose CUDA context is broken, saying to restart."""
    from studio.config import ConfigError

    why = gpu_blocker()
    if why and str(device).startswith("cuda"):
        raise ConfigError("device", why)
