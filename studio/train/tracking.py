"""Run tracking the way the ecosystem does it: TensorBoard always, Weights & Biases on request.

Every run writes TensorBoard event files into `<run>/tensorboard/` (transformers'
TensorBoardCallback, pointed there by `build_trainer`), so

    tensorboard --logdir ~/.lora-studio/runs

shows every run side by side. W&B is used only when the user ticked "Also log to Weights &
Biases" (RunConfig.wandb) AND set it up (the `wandb` package, plus WANDB_API_KEY or a
`wandb login`); it is never required and never installed by the studio.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"  # inside the run folder
WANDB_HOST = "api.wandb.ai"


def wandb_status() -> tuple[bool, str]:
    """(usable, why): W&B needs its package and a key (WANDB_API_KEY or `wandb login`)."""
    if importlib.util.find_spec("wandb") is None:
        return False, "the wandb package is not installed (pip install wandb, then wandb login)"
    if os.environ.get("WANDB_API_KEY"):
        return True, "WANDB_API_KEY is set"
    try:  # `wandb login` stores the key in ~/.netrc
        if netrc.netrc().authenticators(WANDB_HOST):
            return True, "logged in with `wandb login`"
    except (OSError, netrc.NetrcParseError):
        pass
    return False, "no W&B key: run `wandb login` or set WANDB_API_KEY"


def report_to(wandb_wanted: bool) -> list[str]:
    """The integrations transformers reports to: tensorboard when installed, wandb when asked
    for and set up (an unusable wandb would fail the run at its first step)."""
    out = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    if wandb_wanted and wandb_status()[0]:
        out.append("wandb")
    return out


def tracking_note(wandb_wanted: bool) -> str:
    """One line for the run log and the Train tab: where this run's curves go."""
    where = "TensorBoard: tensorboard --logdir ~/.lora-studio/runs"
    if importlib.util.find_spec("tensorboard") is None:
        where = "TensorBoard: not installed (pip install tensorboard)"
    if not wandb_wanted:
        return where
    ok, why = wandb_status()
    return f"{where}; W&B: {'on' if ok else 'off'} ({why})"


def point_tensorboard_at(trainer: Any, run_dir: Path) -> None:
    """Make transformers' TensorBoardCallback write into `<run>/tensorboard/`.

    Without this it writes under the checkpoints folder (output_dir/runs/<date_host>), which
    is not where a user looks and is pruned with old checkpoints.
    """
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.logging_dir = str(run_dir / TENSORBOARD_DIR)
