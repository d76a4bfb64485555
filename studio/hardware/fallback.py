"""Spotting the Windows driver's "sysmem fallback" in a running job's log.

From driver 536.40, NVIDIA's Windows driver moves memory that does not fit on the card into
system RAM instead of failing with out-of-memory. The run then goes on 10-50x slower, the
studio's out-of-memory advice never fires, and the peak memory passes the card's size. Both
show in the log the Train tab already polls, so the tab can name the setting that stops it.
"""

from __future__ import annotations

import functools
from typing import Any

from studio import compat

SLOWDOWN = 5.0  # a log window this many times slower than the best one before it


def sysmem_fallback_warning(
    history: list[dict[str, Any]], card_mb: float | None = None
) -> str | None:
    """The warning for the Train tab, or None: on Windows only, for a GPU run whose peak
    memory passed the card's `card_mb` (default: the first card's), or whose steps suddenly
    slowed down."""
    if not compat.sysmem_fallback_possible():
        return None
    card_mb = card_mb if card_mb is not None else card_total_mb()
    train = [e for e in history if e.get("kind") == "train"]
    train = [e for e in train if str(e.get("memory_kind", "")).startswith("GPU")]
    peak = max((float(e.get("peak_memory_mb") or 0) for e in train), default=0.0)
    rates = [float(e["tokens_per_s"]) for e in train if e.get("tokens_per_s")]
    if card_mb and peak > card_mb:
        why = f"peak memory {peak / 1024:.1f} GiB is more than the card's {card_mb / 1024:.1f} GiB"
    elif len(rates) >= 3 and rates[-1] * SLOWDOWN < max(rates[:-1]):
        why = f"steps became {max(rates[:-1]) / rates[-1]:.0f}x slower"
    else:
        return None
    return (
        f"⚠️ The NVIDIA driver seems to be moving GPU memory into system RAM ({why}): the run"
        " goes on 10-50x slower instead of stopping with out-of-memory. Stop it, then set "
        + compat.SYSMEM_FALLBACK_ADVICE
    )


@functools.cache
def card_total_mb(index: int = 0) -> float | None:
    """The card's memory in MiB from the driver (asked once: the tab polls every second)."""
    from studio.hardware.detect import nvidia_smi

    cards = nvidia_smi() or []
    return cards[index]["memory_bytes"] / 2**20 if index < len(cards) else None
