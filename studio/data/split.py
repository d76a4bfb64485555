"""The train/validation split of a dataset, and the normalized JSONL a run trains from.

The split is a seeded shuffle, so the same rows and seed always give the same split; the
Dataset tab shows its sizes and the run folder keeps both halves as chat-messages JSONL.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from studio.data.normalize import Row

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SEED = 42


def split_sizes(n: int, val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[int, int]:
    """(train, validation) sizes for n rows: at least one validation row when there are 2+."""
    if n < 2 or val_fraction <= 0:
        return n, 0
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return n - n_val, n_val


def split_rows(
    rows: list[Any], val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = DEFAULT_SEED
) -> tuple[list[Any], list[Any]]:
    """Shuffle with a fixed seed and hold out a validation share; same input, same split."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    _, n_val = split_sizes(len(rows), val_fraction)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in val_idx]
    val = [rows[i] for i in sorted(val_idx)]
    return train, val


def write_normalized(rows: list[Row], dest: str | Path) -> Path:
    """Write rows as chat-messages JSONL (UTF-8); refuses to overwrite an existing file."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("x", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps({"messages": row["messages"]}, ensure_ascii=False))
            f.write("\n")
    return dest
