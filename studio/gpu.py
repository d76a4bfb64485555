"""The device a model goes on, and the GPU handed between Chat and training.

Foundation layer (imports only `studio.runs`), because both sides of the hand-over use it:
training (`studio.train.jobs`) asks every holder of a model to let go before it loads its
own, and Chat (`studio.chat.engine`) asks whether a run is training on the GPU before it
loads. Neither imports the other: Chat registers its engines here (`hold`), the Train tab's
job manager registers where to read its active run (`watch_training`).
torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


def default_device(device: str | None = None) -> str:
    """`device` when one is named; else (None, "" or "auto") CUDA when torch sees a GPU, else
    the CPU. The one rule for a device nobody picked: Chat, the loader, the doctor, training's
    hand-over."""
    if device and device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def card(gpu_index: int, device: str) -> str:
    """The torch device string of a run: "cuda:N" for the chosen card, else `device`."""
    return f"cuda:{gpu_index}" if device == "cuda" else device


def free_memory() -> None:
    """Give memory back after a model's last reference was dropped (RAM, and the GPU's cache)."""
    gc.collect()
    with contextlib.suppress(Exception):  # no torch, or a broken CUDA: nothing more to free
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the hand-over


class Holder(Protocol):
    def release(self, reason: str) -> str | None:
        """Drop the model; the label of what was loaded, or None when nothing was."""


# Every model holder of this process (Chat's engines), so training can free their GPU memory.
_HOLDERS: weakref.WeakSet[Any] = weakref.WeakSet()
# Where the Train tab's job manager says which run it trains (None: no manager yet).
_active_job: Callable[[], Path | None] | None = None


def hold(holder: Holder) -> None:
    """Register a model holder: `release_for_training` unloads it before a GPU run."""
    _HOLDERS.add(holder)


def watch_training(active_run_dir: Callable[[], Path | None]) -> None:
    """Register the in-process job manager's view of its active run (`training_blocker`)."""
    global _active_job
    _active_job = active_run_dir


def release_for_training(device: str | None = None, run_name: str = "") -> str | None:
    """Unload every registered model before a training run loads its own; the message says so.

    Training calls this right before it loads its model (`studio.train.jobs`). On CUDA the
    chat model would share the card's memory with training and can push a 12 GB card into
    out-of-memory, so it is unloaded (a batch compare in progress stops, and its finished
    rows are saved to the run it started with). On CPU it stays loaded: system RAM is
    usually several times the size of a model small enough to train on a CPU, and chatting
    during CPU training is allowed (`training_blocker`); returns None then, as when nothing
    was loaded. `device` is the device training will use (None: CUDA when visible).
    """
    if not default_device(device).lower().startswith("cuda"):
        return None
    why = f"training{f' ({run_name})' if run_name else ''} needs the GPU memory"
    released = [label for holder in list(_HOLDERS) if (label := holder.release(why))]
    if not released:
        return None
    return (
        f"Unloaded the Chat model ({', '.join(released)}) so that training has the GPU memory;"
        " load it again in the Chat tab when the run has ended."
    )


def training_blocker() -> str | None:
    """A message when a training run is active on a GPU (chat would compete for its VRAM).

    On CPU, chatting during training is allowed (slow, but harmless). Runs trained by any
    process count: a run folder whose training process is alive (`studio.runs`), plus the
    Train tab's job in this process (`watch_training`). A check that fails is not a pass:
    the answer is then a refusal that says what went wrong (fail closed), because loading a
    chat model next to a GPU run can crash it with out-of-memory.
    """
    for active in (_active_job_run, _active_run_on_disk):
        try:
            found = active()
        except Exception as exc:
            return (
                "Could not check whether a training run is using the GPU"
                f" ({type(exc).__name__}: {exc}), so the chat model is not loaded: loading it"
                " next to a GPU run could crash that run with out-of-memory. Look at the Train"
                " tab (and the runs folder), then try again."
            )
        if found:
            name, device = found
            if device.startswith("cuda") or device == "gpu":
                return (
                    f"Training ({name}) is using the GPU right now. Chatting would compete for"
                    " its memory and could crash it with out-of-memory: wait for it to finish"
                    " or stop it in the Train tab, then load the chat model."
                )
    return None


def _active_job_run() -> tuple[str, str] | None:
    """The Train tab's job in this process, as (name, device)."""
    from studio import runs

    run_dir = _active_job() if _active_job is not None else None
    if run_dir is None:
        return None
    # metadata not written yet: the run will use the GPU if there is one
    device = (runs.read_metadata(run_dir).get("device") or {}).get("used") or default_device()
    return run_dir.name, str(device).lower()


def _active_run_on_disk() -> tuple[str, str] | None:
    """A run folder some live process is training (CLI or app), as (name, device)."""
    from studio import runs

    found = None
    for info in runs.list_runs():
        if info.status == "running":
            device = str((info.metadata.get("device") or {}).get("used") or "").lower()
            if device.startswith("cuda"):
                return info.name, device
            found = found or (info.name, device)
    return found
