"""Hardware presets: one commented YAML file per GPU (or the CPU) in the repo's presets/.

A preset holds what the studio needs to know about a card (VRAM, compute capability and
bf16 support, typical board power for the electricity estimate) and default training
settings per model-size band: the memory settings, and the recipe (learning rate, LoRA
shape, warmup, epochs with a floor and a cap of steps) that studio/train/plan.py sizes to
the dataset. Users drop their own files into `<data dir>/presets/`; a bad
file is reported with its path and field and never hides the others.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from studio import paths
from studio.config import METHODS, OPTIMIZERS, TARGETS

REPO_PRESETS = Path(__file__).resolve().parents[2] / "presets"
KINDS = ("cuda", "cpu")
# DPO's recipe per band (README "Preference tuning"); optional, so presets written before
# DPO (a user's copy) still load, with these defaults: beta 0.1, the SFT rate / 10 (DPO moves
# a model with far smaller steps than SFT), one pass.
DPO_FIELDS = ("dpo_beta", "dpo_learning_rate", "dpo_epochs", "dpo_step_cap", "dpo_sft_weight")
# Model-size bands by parameter count; a model above the last band uses the last one.
BANDS: dict[str, float] = {"up_to_1b": 1.0e9, "1b_to_4b": 4.0e9, "4b_to_9b": 9.0e9}
BAND_LABELS = {"up_to_1b": "up to 1B", "1b_to_4b": "1B to 4B", "4b_to_9b": "4B to 9B"}
# Band fields that are not RunConfig settings: studio/train/plan.py turns them into epochs.
PLAN_ONLY = ("epochs", "min_steps", "step_cap", "max_epochs", "tokens_per_s", *DPO_FIELDS)
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_CC_RE = re.compile(r"^\d+\.\d+$")
_OPTIONAL_BAND_FIELDS = ("tokens_per_s", *DPO_FIELDS)
# The recipe fields a preset written before recipes existed lacks; a user's copy of such a
# file takes them from the repo's preset of its kind (with a notice) rather than failing.
RECIPE_FIELDS = ("learning_rate", "warmup_ratio", "epochs", "min_steps", "step_cap", "max_epochs")


class PresetError(ValueError):
    """A preset is invalid; the message names the file (when known) and the field."""

    def __init__(self, field_name: str, message: str, path: Path | None = None) -> None:
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{field_name}: {message}")
        self.field = field_name
        self.path = path


@dataclass
class BandDefaults:
    """Default run settings for one model-size band; field names are RunConfig's."""

    method: str
    batch_size: int
    grad_accum: int
    max_seq_len: int
    gradient_checkpointing: bool
    optimizer: str
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: str
    # The recipe (studio/train/plan.py sizes it to the dataset): why each value, in the YAML.
    learning_rate: float
    warmup_ratio: float  # share of the steps spent ramping the learning rate up
    epochs: float  # passes over a dataset that is neither tiny nor huge
    min_steps: int  # floor: a small dataset gets more epochs until it has this many steps
    step_cap: int  # cap: a huge dataset gets fewer epochs (never under 1) to stay near this
    max_epochs: float  # the floor never raises epochs past this (tiny sets would memorize)
    tokens_per_s: float = 0.0  # rough training throughput for the time estimate; 0: unknown
    dpo_beta: float = 0.1  # DPO: how close to the reference the adapter stays
    dpo_learning_rate: float = 0.0  # DPO's rate; 0: the SFT rate / 10
    dpo_epochs: float = 1.0  # passes over the preference pairs
    dpo_step_cap: int = 0  # at most this many DPO steps (0: the SFT step_cap)
    dpo_sft_weight: float = 0.0  # SFT loss on the chosen answers beside DPO's (RPO); 0: none

    def __post_init__(self) -> None:
        _expect(self.method in METHODS, "method", f"use one of {', '.join(METHODS)}")
        _expect(self.optimizer in OPTIMIZERS, "optimizer", f"use one of {', '.join(OPTIMIZERS)}")
        _expect(
            self.target_modules in TARGETS, "target_modules", f"use one of {', '.join(TARGETS)}"
        )
        _expect(_is_int(self.batch_size, 1, 1024), "batch_size", "a whole number 1 to 1024")
        _expect(_is_int(self.grad_accum, 1, 1024), "grad_accum", "a whole number 1 to 1024")
        _expect(_is_int(self.max_seq_len, 16, 131072), "max_seq_len", "a whole number 16-131072")
        _expect(_is_int(self.lora_r, 1, 1024), "lora_r", "a whole number 1 to 1024")
        _expect(_is_int(self.lora_alpha, 1, 4096), "lora_alpha", "a whole number, often 2 x r")
        _expect(
            isinstance(self.lora_dropout, int | float)
            and not isinstance(self.lora_dropout, bool)
            and 0 <= self.lora_dropout < 1,
            "lora_dropout",
            "a number from 0 to 1 (0.05 is usual)",
        )
        _expect(
            isinstance(self.gradient_checkpointing, bool),
            "gradient_checkpointing",
            "true or false",
        )
        self._check_recipe()

    def _check_recipe(self) -> None:
        """The recipe fields: each in a range a LoRA run can use."""
        _expect(
            _is_number(self.learning_rate, 1e-7, 0.1),
            "learning_rate",
            "a number such as 2e-4 (LoRA: 1e-4 to 2e-3)",
        )
        _expect(_is_number(self.warmup_ratio, 0, 0.5), "warmup_ratio", "0 to 0.5 (0.03 is usual)")
        _expect(_is_number(self.epochs, 0.01, 100), "epochs", "a number of passes, 0.01 to 100")
        _expect(_is_int(self.min_steps, 1, 100_000), "min_steps", "a whole number 1 to 100000")
        _expect(
            _is_int(self.step_cap, 1, 10_000_000) and self.step_cap >= self.min_steps,
            "step_cap",
            "a whole number, at least min_steps",
        )
        _expect(
            _is_number(self.max_epochs, 1, 1000) and self.max_epochs >= self.epochs,
            "max_epochs",
            "a number of passes, at least epochs",
        )
        _expect(_is_number(self.tokens_per_s, 0, 1e9), "tokens_per_s", "0 (unknown) or more")
        _expect(_is_number(self.dpo_beta, 0.001, 10), "dpo_beta", "a number such as 0.1")
        _expect(
            self.dpo_learning_rate == 0 or _is_number(self.dpo_learning_rate, 1e-8, 0.1),
            "dpo_learning_rate",
            "0 (the SFT rate / 10) or a number such as 5e-6",
        )
        _expect(_is_number(self.dpo_epochs, 0.01, 100), "dpo_epochs", "a number of passes")
        _expect(_is_int(self.dpo_step_cap, 0, 10_000_000), "dpo_step_cap", "0 (none) or more")
        _expect(_is_number(self.dpo_sft_weight, 0, 10), "dpo_sft_weight", "0 (plain DPO) to 10")

    def for_dpo(self) -> SimpleNamespace:
        """The band's recipe fields with DPO's in those the plan sizes (`plan.plan_recipe`):
        its rate, passes and step cap, no floor (preference pairs are not repeated to reach
        a step count), and a cap that may end a run inside its first pass (`objective`
        "dpo"): on a CPU a few pairs already move the adapter, a whole pass would take long."""
        return SimpleNamespace(
            **{
                **dataclasses.asdict(self),
                "learning_rate": self.dpo_learning_rate or self.learning_rate / 10,
                "epochs": self.dpo_epochs,
                "min_steps": 1,
                "step_cap": self.dpo_step_cap or self.step_cap,
                "max_epochs": max(self.dpo_epochs, 1.0),
                "objective": "dpo",
            }
        )

    def to_settings(self) -> dict[str, Any]:
        """The RunConfig fields the band sets as they are; the plan sizes the rest."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PLAN_ONLY}


@dataclass
class Preset:
    """One target machine: a GPU model, or the CPU."""

    name: str
    label: str
    kind: str  # cuda or cpu
    vram_gb: float  # the card's memory in GiB; 0 for the CPU (the fit check uses RAM)
    compute_capability: str | None  # "8.6"; None for the CPU
    bf16: bool
    board_power_w: float  # typical draw while training, for the electricity estimate
    bands: dict[str, BandDefaults]
    match: list[str] = field(default_factory=list)  # detected GPU names containing one of these
    notes: str = ""
    path: Path | None = None
    user: bool = False  # from the user's data dir, not the repo

    def __post_init__(self) -> None:
        _expect(
            isinstance(self.name, str) and bool(_NAME_RE.match(self.name)),
            "name",
            "use lowercase letters, digits, '.', '-' or '_' (e.g. rtx3060-12gb)",
        )
        _expect(isinstance(self.label, str) and bool(self.label.strip()), "label", "required")
        _expect(self.kind in KINDS, "kind", f"use one of {', '.join(KINDS)}")
        _expect(_is_number(self.vram_gb, 0, 1024), "vram_gb", "a number of GiB, 0 to 1024")
        _expect(_is_number(self.board_power_w, 1, 5000), "board_power_w", "watts, 1 to 5000")
        _expect(isinstance(self.bf16, bool), "bf16", "true or false")
        _expect(
            isinstance(self.match, list) and all(isinstance(m, str) for m in self.match),
            "match",
            "a list of name fragments, e.g. ['RTX 3060']",
        )
        if self.kind == "cuda":
            _expect(self.vram_gb > 0, "vram_gb", "a GPU preset needs its memory size")
            cc = self.compute_capability
            _expect(
                isinstance(cc, str) and bool(_CC_RE.match(cc)),
                "compute_capability",
                "write it as a quoted string such as '8.6'",
            )
            _expect(
                not self.bf16 or float(str(cc)) >= 8.0,
                "bf16",
                "bf16 needs compute capability 8.0 or newer (Ampere)",
            )
        _expect(isinstance(self.bands, dict), "bands", f"a mapping with {', '.join(BANDS)}")
        missing = [b for b in BANDS if b not in self.bands]
        _expect(not missing, "bands", f"missing {', '.join(missing)}")
        unknown = [b for b in self.bands if b not in BANDS]
        _expect(not unknown, "bands", f"unknown band {', '.join(map(str, unknown))}")

    @property
    def vram_bytes(self) -> int:
        return int(self.vram_gb * 1024**3)

    def defaults_for(self, n_params: int) -> dict[str, Any]:
        return defaults_for(self, n_params)


@dataclass
class PresetCatalog:
    """Every preset that loaded, and a message for each file that did not."""

    presets: dict[str, Preset]
    problems: list[str]
    notices: list[str] = field(default_factory=list)  # loaded, with something filled in

    def names(self) -> list[str]:
        return list(self.presets)

    def get(self, name: str) -> Preset:
        try:
            return self.presets[name]
        except KeyError:
            raise KeyError(f"no preset named {name!r}; known: {', '.join(self.presets)}") from None


def _expect(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise PresetError(field_name, message)


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


def preset_from_dict(
    data: Any, path: Path | None = None, user: bool = False, recipe_from: Preset | None = None
) -> Preset:
    """Build and validate a preset from parsed YAML; errors name the file and field.

    `recipe_from` fills recipe fields a band lacks (a user's preset from before recipes)."""
    try:
        if not isinstance(data, dict):
            raise PresetError("(file)", "must be a mapping of settings (name: ..., label: ...)")
        known = {f.name for f in fields(Preset)} - {"path", "user"}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise PresetError(unknown[0], f"unknown field (known: {', '.join(sorted(known))})")
        missing = sorted(
            name
            for name in ("name", "label", "kind", "vram_gb", "board_power_w", "bands")
            if name not in data
        )
        if missing:
            raise PresetError(missing[0], "required field is missing")
        raw_bands = data.get("bands")
        if not isinstance(raw_bands, dict):
            raise PresetError("bands", f"a mapping with {', '.join(BANDS)}")
        bands = {}
        for band, values in raw_bands.items():
            recipe = recipe_from.bands.get(str(band)) if recipe_from is not None else None
            bands[str(band)] = _band_from_dict(str(band), values, recipe)
        values = {**data, "bands": bands}
        values.setdefault("compute_capability", None)
        if isinstance(values["compute_capability"], int | float) and not isinstance(
            values["compute_capability"], bool
        ):  # an unquoted 8.6 in YAML is a float
            values["compute_capability"] = f"{float(values['compute_capability']):.1f}"
        values.setdefault("bf16", False)
        if values.get("match") is None:
            values["match"] = []
        if values.get("notes") is None:
            values["notes"] = ""
        return Preset(**values, path=path, user=user)
    except PresetError as exc:
        if path is not None and exc.path is None:
            raise PresetError(exc.field, str(exc).split(": ", 1)[-1], path) from None
        raise


def _band_from_dict(band: str, values: Any, recipe: BandDefaults | None = None) -> BandDefaults:
    """One band's settings; with `recipe`, missing recipe fields are taken from it."""
    prefix = f"bands.{band}"
    if not isinstance(values, dict):
        raise PresetError(prefix, "a mapping of run settings (method, batch_size, ...)")
    names = [f.name for f in fields(BandDefaults)]
    unknown = sorted(str(k) for k in values if k not in names)
    if unknown:
        raise PresetError(f"{prefix}.{unknown[0]}", f"unknown setting (known: {', '.join(names)})")
    if recipe is not None:
        values = {**{n: getattr(recipe, n) for n in RECIPE_FIELDS}, **values}
    missing = [n for n in names if n not in values and n not in _OPTIONAL_BAND_FIELDS]
    if missing:
        raise PresetError(f"{prefix}.{missing[0]}", "required setting is missing")
    try:
        return BandDefaults(**values)
    except PresetError as exc:
        raise PresetError(f"{prefix}.{exc.field}", str(exc).split(": ", 1)[-1]) from None


def load_preset_file(
    path: str | Path, user: bool = False, recipes: dict[str, Preset] | None = None
) -> Preset:
    """Read one preset YAML (safe_load) and validate it; `recipes` (kind -> preset) fills a
    band's missing recipe fields from the preset of the file's kind."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError("(file)", f"cannot read it: {exc}", path) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PresetError("(yaml)", f"not valid YAML{where}: {exc}", path) from exc
    kind = data.get("kind") if isinstance(data, dict) else None
    recipe_from = (recipes or {}).get(kind) if isinstance(kind, str) else None
    return preset_from_dict(data, path, user, recipe_from)


def user_presets_dir() -> Path:
    """Where a user drops presets of their own (created on first use)."""
    folder = paths.data_dir() / "presets"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def load_presets(repo_dir: Path | None = None, user_dir: Path | None = None) -> PresetCatalog:
    """The repo's presets, then the user's; a bad or clashing file becomes a problem message."""
    presets: dict[str, Preset] = {}
    problems: list[str] = []
    notices: list[str] = []
    sources = [(repo_dir or REPO_PRESETS, False), (user_dir or user_presets_dir(), True)]
    for folder, user in sources:
        if not folder.is_dir():
            continue
        files = sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])
        recipes = _recipe_sources(presets) if user else None
        for path in files:
            try:
                preset = load_preset_file(path, user, recipes)
            except PresetError as exc:
                problems.append(str(exc))
                continue
            if user and (note := _recipe_notice(path, preset, recipes or {})):
                notices.append(note)
            if preset.name in presets:
                other = presets[preset.name].path
                problems.append(
                    f"{path}: name: '{preset.name}' is already used by {other}; give this"
                    " preset another name"
                )
                continue
            presets[preset.name] = preset
    return PresetCatalog(presets, problems, notices)


def _recipe_sources(presets: dict[str, Preset]) -> dict[str, Preset]:
    """kind -> the repo preset whose recipes a user's older preset of that kind borrows:
    the CPU preset for the CPU, the smallest-memory GPU preset for cards (its recipe is the
    GPU consensus; all GPU presets share it)."""
    sources: dict[str, Preset] = {}
    for preset in sorted(presets.values(), key=lambda p: (p.vram_gb, p.name)):
        sources.setdefault(preset.kind, preset)
    return sources


def _recipe_notice(path: Path, preset: Preset, recipes: dict[str, Preset]) -> str | None:
    """Say when a user's preset borrowed recipe fields, so the figures are not a surprise."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw = data.get("bands", {}) if isinstance(data, dict) else {}
    lacking = sorted(
        {n for b in raw.values() if isinstance(b, dict) for n in RECIPE_FIELDS if n not in b}
    )
    source = recipes.get(preset.kind)
    if not lacking or source is None:
        return None
    return (
        f"{path}: no {', '.join(lacking)} in some bands (a preset from before recipes):"
        f" using those of the built-in '{source.name}' preset; add them to the file to"
        " choose your own"
    )


def band_for(n_params: int) -> str:
    """The model-size band a parameter count falls in (the largest band above its top)."""
    for band, top in BANDS.items():
        if n_params <= top:
            return band
    return list(BANDS)[-1]


def defaults_for(preset: Preset, n_params: int) -> dict[str, Any]:
    """RunConfig field values for training a model of `n_params` on `preset`."""
    settings = preset.bands[band_for(n_params)].to_settings()
    settings["preset"] = preset.name
    return settings
