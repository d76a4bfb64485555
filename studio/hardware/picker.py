"""The model picker's data: each catalogue model with its download size and whether it fits
the chosen card for LoRA and for QLoRA (studio.hardware.vram's estimate, from reference
shapes, so it answers offline and at once). The UI only turns these rows into labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from studio.hardware import vram
from studio.hardware.presets import Preset, defaults_for
from studio.models.catalog import catalog


@dataclass(frozen=True)
class PickerRow:
    """One entry of the picker: a catalogue model or its pre-quantized 4-bit twin."""

    model_id: str
    n_params: int
    download_bytes: int
    gated: bool
    prequantized: bool
    lora: str | None  # "fits", "tight", "won't fit"; None: not offered (a 4-bit base)
    qlora: str


def verdict_for_model(
    shape: vram.ModelShape,
    preset: Preset,
    method: str,
    *,
    capacity_bytes: int,
    in_use_bytes: int,
    device: str,
) -> str:
    """The verdict for training `shape` with `method` at the preset's settings for its size."""
    settings = {**defaults_for(preset, shape.n_params), "method": method}
    est = vram.estimate(
        shape, settings, capacity_bytes=capacity_bytes, in_use_bytes=in_use_bytes, device=device
    )
    return est.verdict


def picker_rows(
    preset: Preset, *, capacity_bytes: int, in_use_bytes: int, device: str
) -> list[PickerRow]:
    """Every catalogue model (then its 4-bit twin), smallest first, with its fit on `preset`."""
    rows = []
    memory: dict[str, Any] = {
        "capacity_bytes": capacity_bytes,
        "in_use_bytes": in_use_bytes,
        "device": device,
    }
    for entry in catalog().values():
        shape = vram.model_shape(entry.id)
        qlora = verdict_for_model(shape, preset, "qlora", **memory)
        lora = verdict_for_model(shape, preset, "lora", **memory)
        rows.append(
            PickerRow(
                entry.id, shape.n_params, entry.download_bytes, entry.gated, False, lora, qlora
            )
        )
        if entry.bnb_4bit:
            size = int((entry.bnb_4bit_gb or 0) * 10**9)
            rows.append(PickerRow(entry.bnb_4bit, shape.n_params, size, False, True, None, qlora))
    rows.sort(key=lambda r: r.n_params)
    return rows
