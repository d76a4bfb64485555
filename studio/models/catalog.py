"""The model catalogue (catalog.yaml): what the pickers list, and what a hub id is.

Besides the listing, it answers two questions other stages ask about a model id without
touching the network: is it a pre-quantized 4-bit base (`is_prequantized`), and which 16-bit
model is it a copy of (`original_of`, which export uses to merge into full weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

CATALOG_FILE = Path(__file__).with_name("catalog.yaml")
GB = 10**9
# Suffixes of pre-quantized bitsandbytes uploads (Unsloth names them both ways).
_BNB_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit")


class CatalogError(ValueError):
    """A catalogue entry is wrong; the message names the file, model and field."""


@dataclass(frozen=True)
class CatalogModel:
    """One model of the catalogue (field meanings: the comment at the top of catalog.yaml)."""

    id: str
    family: str
    params_b: float
    download_gb: float
    licence: str
    gated: bool
    template: str
    bnb_4bit: str | None = None
    bnb_4bit_gb: float | None = None

    def __post_init__(self) -> None:
        def expect(ok: bool, field: str, what: str) -> None:
            if not ok:
                value = getattr(self, field)
                raise CatalogError(f"{self.id}.{field}: expected {what}, not {value!r}")

        expect(isinstance(self.id, str) and self.id.count("/") == 1, "id", "a hub id owner/name")
        for name in ("family", "licence", "template"):
            expect(isinstance(getattr(self, name), str) and getattr(self, name), name, "a name")
        for name in ("params_b", "download_gb"):
            value = getattr(self, name)
            expect(_positive(value), name, "a positive number")
        expect(isinstance(self.gated, bool), "gated", "true or false")
        if self.bnb_4bit is not None:
            expect(is_prequantized(self.bnb_4bit), "bnb_4bit", "an id ending in -bnb-4bit")
            expect(_positive(self.bnb_4bit_gb), "bnb_4bit_gb", "the twin's size in GB")

    @property
    def download_bytes(self) -> int:
        return int(self.download_gb * GB)

    @property
    def page(self) -> str:
        return f"https://huggingface.co/{self.id}"


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def load_catalog(path: Path = CATALOG_FILE) -> dict[str, CatalogModel]:
    """Hub id -> entry, in the file's order; a bad entry raises CatalogError naming it."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data:
        raise CatalogError(f"{path}: expected a mapping of hub id to model fields")
    known = {f.name for f in fields(CatalogModel)} - {"id"}
    models = {}
    for model_id, values in data.items():
        if not isinstance(values, dict):
            raise CatalogError(f"{path}: {model_id}: expected a mapping of fields")
        unknown = sorted(set(values) - known)
        if unknown:
            raise CatalogError(f"{path}: {model_id}: unknown fields {unknown}")
        try:
            models[str(model_id)] = CatalogModel(id=str(model_id), **values)
        except TypeError as exc:  # a required field is missing
            raise CatalogError(f"{path}: {model_id}: {exc}") from exc
        except CatalogError as exc:
            raise CatalogError(f"{path}: {exc}") from exc
    return models


@lru_cache(maxsize=1)
def catalog() -> dict[str, CatalogModel]:
    return load_catalog()


def lookup(model_id: str) -> CatalogModel | None:
    """The entry for an id or for its 4-bit twin (case does not matter, as on the hub)."""
    wanted = (model_id or "").strip().lower()
    for entry in catalog().values():
        if wanted in (entry.id.lower(), (entry.bnb_4bit or "").lower()):
            return entry
    return None


def is_prequantized(model_id: str) -> bool:
    """A base stored in 4-bit already: a `*-bnb-4bit` id, or a local folder whose config.json
    says bitsandbytes 4-bit. QLoRA loads it as it is; LoRA and a plain merge cannot."""
    name = (model_id or "").strip()
    if name.lower().endswith(_BNB_SUFFIXES):
        return True
    quant = quantization_of(Path(name).expanduser()) or {}
    return bool(quant.get("load_in_4bit")) or quant.get("quant_method") == "bitsandbytes"


def quantization_of(folder: Path) -> dict[str, Any] | None:
    """The folder's `quantization_config` (config.json), or None for plain weights."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return quant if isinstance(quant, dict) and quant else None


def original_of(model_id: str) -> str | None:
    """The 16-bit model a pre-quantized id is a copy of, or None when unknown (or not one).

    Catalogue twins map exactly; other `*-bnb-4bit` ids by name, so that Unsloth's
    "unsloth/Qwen3-4B-unsloth-bnb-4bit" finds Qwen/Qwen3-4B too. An id the catalogue does not
    know stays unknown: a guessed original could be another model, and export then refuses
    before any work."""
    name = (model_id or "").strip()
    if not is_prequantized(name):
        return None
    entry = lookup(name)
    if entry is not None and entry.id.lower() != name.lower():
        return entry.id
    base = name.rsplit("/", 1)[-1].lower()
    for suffix in _BNB_SUFFIXES:
        base = base.removesuffix(suffix)
    for entry in catalog().values():
        short = entry.id.rsplit("/", 1)[-1].lower()
        if base in (short, "meta-" + short):
            return entry.id
    return None


def size_text(n_bytes: int | float | None) -> str:
    """3.1 GB, 270 MB: download sizes as the hub writes them (decimal units)."""
    if n_bytes is None:
        return "size unknown"
    if n_bytes >= GB:
        return f"{n_bytes / GB:.1f} GB"
    return f"{n_bytes / 10**6:.0f} MB"
