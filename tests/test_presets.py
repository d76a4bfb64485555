"""Hardware presets: every shipped file loads and its defaults fit its card; user presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from studio.config import RunConfig
from studio.hardware import vram
from studio.hardware.presets import (
    BANDS,
    REPO_PRESETS,
    PresetError,
    band_for,
    defaults_for,
    load_preset_file,
    load_presets,
)

PRESET_FILES = sorted(REPO_PRESETS.glob("*.yaml"))
EXPECTED = {  # preset -> card memory (GiB)
    "rtx3060-12gb": 12,
    "rtx3070-8gb": 8,
    "rtx3080-10gb": 10,
    "rtx3080-12gb": 12,
    "rtx3090-24gb": 24,
    "rtx4060-8gb": 8,
    "rtx4060ti-16gb": 16,
    "rtx4070-12gb": 12,
    "rtx4080-16gb": 16,
    "rtx4090-24gb": 24,
    "rtx5060ti-16gb": 16,
    "rtx5070-12gb": 12,
    "rtx5070ti-16gb": 16,
    "rtx5080-16gb": 16,
    "rtx5090-32gb": 32,
    "cpu": 0,
}
# Compute capability by architecture: Ampere 8.6, Ada 8.9, Blackwell (RTX 50) 12.0.
ARCHITECTURE = {"rtx30": "8.6", "rtx40": "8.9", "rtx50": "12.0"}
# A PC for the CPU preset: 16 GiB of RAM, 4 GiB of it used by the desktop and a browser.
CPU_PC_RAM, CPU_PC_IN_USE = 16 * vram.GIB, 4 * vram.GIB
# Reference models per band: the largest ones decide whether a band's defaults fit.
BAND_MODELS = {
    "up_to_1b": ["HuggingFaceTB/SmolLM2-360M-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"],
    "1b_to_4b": [
        "meta-llama/Llama-3.2-1B-Instruct",
        "Qwen/Qwen2.5-1.5B-Instruct",
        "Qwen/Qwen2.5-3B-Instruct",
        "meta-llama/Llama-3.2-3B-Instruct",
    ],
    "4b_to_9b": ["Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"],
}


def _valid(name: str = "my-card") -> dict:
    data = yaml.safe_load((REPO_PRESETS / "rtx3060-12gb.yaml").read_text(encoding="utf-8"))
    data["name"] = name
    data["label"] = f"My card ({name})"
    data["match"] = []
    return data


def test_every_target_has_a_preset_file() -> None:
    assert {p.stem for p in PRESET_FILES} == set(EXPECTED)


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_preset_file_loads_and_validates(path: Path) -> None:
    preset = load_preset_file(path)
    assert preset.name == path.stem
    assert preset.vram_gb == EXPECTED[preset.name]
    assert set(preset.bands) == set(BANDS)
    assert path.read_text(encoding="utf-8").lstrip().startswith("#"), "presets are commented"
    for band, defaults in preset.bands.items():
        settings = defaults_for(preset, int(BANDS[band] * 0.9))
        assert settings["preset"] == preset.name
        RunConfig.from_dict(settings).validate()  # the Train tab can take them as they are
        if preset.kind == "cuda":
            assert defaults.optimizer == "paged_adamw_8bit"
            assert defaults.batch_size * defaults.grad_accum == 16
    if preset.kind == "cuda":
        assert preset.bf16 == (float(preset.compute_capability) >= 8.0)
        assert preset.compute_capability == ARCHITECTURE[preset.name[:5]]
        assert preset.match, "a GPU preset names the cards it stands for"


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_band_defaults_fit_the_card(path: Path) -> None:
    """Every preset's defaults fit (10% spare) its card for the models of each band it covers.

    GPU presets: every band, on the card's memory next to a typical desktop. The CPU preset
    covers up to about 0.5B (its notes say so): that band fits in the RAM of a 16 GiB PC, in
    fp32 and with native bf16 alike.
    """
    preset = load_preset_file(path)
    if preset.kind == "cpu":
        bands = {"up_to_1b": BAND_MODELS["up_to_1b"]}
        profiles, capacity, in_use = ("cpu", "cpu-bf16"), CPU_PC_RAM, CPU_PC_IN_USE
    else:
        bands = BAND_MODELS
        profiles, capacity, in_use = ("cuda",), preset.vram_bytes, vram.TYPICAL_DESKTOP_USE
    for band, models in bands.items():
        for model in models:
            shape = vram.model_shape(model)
            assert band_for(shape.n_params) == band
            for device in profiles:
                est = vram.estimate(
                    shape,
                    defaults_for(preset, shape.n_params),
                    capacity_bytes=capacity,
                    in_use_bytes=in_use,
                    device=device,
                )
                assert est.verdict == "fits", f"{preset.name} {band} {model}: {est.summary()}"


def test_cpu_preset_trains_the_embedded_model_quickly() -> None:
    cpu = load_preset_file(REPO_PRESETS / "cpu.yaml")
    shape = vram.model_shape("HuggingFaceTB/SmolLM2-135M-Instruct")
    settings = defaults_for(cpu, shape.n_params)
    assert settings["method"] == "lora"
    assert settings["batch_size"] * settings["grad_accum"] == 4  # 41 updates on the sample
    assert settings["max_seq_len"] == 512
    assert settings["optimizer"] == "adamw_torch"
    assert settings["gradient_checkpointing"] is False
    assert cpu.kind == "cpu" and cpu.vram_gb == 0


@pytest.mark.parametrize("path", PRESET_FILES, ids=lambda p: p.stem)
def test_every_band_has_a_whole_recipe(path: Path) -> None:
    """Learning rate, epochs with a floor and a cap of steps, LoRA shape and warmup, in every
    band; GPU bands follow current practice for 0.5B-8B models, each line commented."""
    preset = load_preset_file(path)
    text = path.read_text(encoding="utf-8")
    for key in ("learning_rate", "warmup_ratio", "epochs", "min_steps", "step_cap", "max_epochs"):
        lines = [line for line in text.splitlines() if line.strip().startswith(f"{key}:")]
        assert len(lines) == 3 and all("#" in line for line in lines), f"{key}: one per band"
    for band, b in preset.bands.items():
        assert b.min_steps <= b.step_cap and b.epochs <= b.max_epochs
        assert (b.lora_r, b.lora_alpha, b.target_modules) == (16, 32, "all_linear")
        if preset.kind == "cuda":
            assert 1 <= b.epochs <= 3 and 0.02 <= b.warmup_ratio <= 0.05
            if band == "up_to_1b":
                assert 5e-4 <= b.learning_rate <= 1e-3  # small models take a higher rate
            else:
                assert 1e-4 <= b.learning_rate <= 2e-4  # the usual rate for 1-8B models


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"learning_rate": 5}, "learning_rate"),
        ({"learning_rate": "2e-4"}, "learning_rate"),  # unquoted 2e-4 is a string in YAML 1.1
        ({"epochs": 0}, "epochs"),
        ({"min_steps": 0}, "min_steps"),
        ({"step_cap": 10}, "step_cap"),  # under min_steps
        ({"max_epochs": 1}, "max_epochs"),  # under epochs (2)
        ({"warmup_ratio": 0.9}, "warmup_ratio"),
        ({"tokens_per_s": -1}, "tokens_per_s"),
    ],
)
def test_bad_recipe_field_is_named(tmp_path: Path, change: dict, field: str) -> None:
    data = _valid()
    data["bands"]["1b_to_4b"].update(change)
    path = tmp_path / "bad-recipe.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(PresetError) as err:
        load_preset_file(path)
    assert err.value.field == f"bands.1b_to_4b.{field}"


def test_recipe_field_is_required(tmp_path: Path) -> None:
    data = _valid()
    del data["bands"]["up_to_1b"]["learning_rate"]
    path = tmp_path / "no-lr.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(PresetError, match=r"bands\.up_to_1b\.learning_rate: required"):
        load_preset_file(path)


def test_bands_by_parameter_count() -> None:
    assert band_for(135_000_000) == "up_to_1b"
    assert band_for(1_000_000_000) == "up_to_1b"
    assert band_for(1_235_814_400) == "1b_to_4b"  # Llama-3.2-1B is a little over 1B
    assert band_for(8_030_261_248) == "4b_to_9b"
    assert band_for(70_000_000_000) == "4b_to_9b"  # bigger than any band: the last one


def test_user_preset_is_listed_and_bad_ones_are_reported(tmp_path: Path) -> None:
    user = tmp_path / "presets"
    user.mkdir()
    (user / "a-good.yaml").write_text(yaml.safe_dump(_valid("my-card")), encoding="utf-8")
    bad = _valid("broken-card")
    bad["bands"]["up_to_1b"]["batch_size"] = "four"
    (user / "b-bad-field.yaml").write_text(yaml.safe_dump(bad), encoding="utf-8")
    (user / "c-bad-yaml.yaml").write_text("name: x\nbands: [unclosed\n", encoding="utf-8")
    (user / "d-clash.yaml").write_text(yaml.safe_dump(_valid("rtx3060-12gb")), encoding="utf-8")

    catalog = load_presets(user_dir=user)

    assert set(EXPECTED) | {"my-card"} == set(catalog.names())
    assert catalog.get("my-card").user is True
    assert catalog.get("rtx3060-12gb").user is False  # the clash did not replace the built-in
    problems = "\n".join(catalog.problems)
    assert len(catalog.problems) == 3, problems
    assert "b-bad-field.yaml: bands.up_to_1b.batch_size: a whole number" in problems
    assert "c-bad-yaml.yaml: (yaml): not valid YAML at line" in problems
    assert "d-clash.yaml: name: 'rtx3060-12gb' is already used" in problems


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bf16": True, "compute_capability": "7.5"}, "bf16"),
        ({"kind": "tpu"}, "kind"),
        ({"vram_gb": 0}, "vram_gb"),
        ({"compute_capability": "eight"}, "compute_capability"),
        ({"colour": "green"}, "colour"),
        ({"bands": {"up_to_1b": {}}}, "bands"),
    ],
)
def test_invalid_preset_names_the_field(tmp_path: Path, change: dict, field: str) -> None:
    data = {**_valid(), **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(PresetError) as err:
        load_preset_file(path)
    assert err.value.path == path
    assert err.value.field.startswith(field)
    assert str(path) in str(err.value)


def test_band_setting_outside_run_config_values_is_refused(tmp_path: Path) -> None:
    data = _valid()
    data["bands"]["4b_to_9b"]["target_modules"] = "everything"
    path = tmp_path / "bad-target.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(PresetError, match=r"bands\.4b_to_9b\.target_modules: use one of qv"):
        load_preset_file(path)


def test_a_user_preset_from_before_recipes_borrows_them_with_a_notice(tmp_path: Path) -> None:
    """A user's copy of a GPU preset made before bands had recipes still loads: the recipe
    comes from the built-in GPU presets (lr 2e-4 for 1-4B, what their YAML states), the
    fields the user did write win, and the Hardware tab is told which were borrowed."""
    user = tmp_path / "presets"
    user.mkdir()
    old = _valid("old-card")
    for band in old["bands"].values():
        for name in ("learning_rate", "warmup_ratio", "epochs", "min_steps", "step_cap"):
            band.pop(name)
        band.pop("max_epochs")
    old["bands"]["up_to_1b"]["learning_rate"] = 7.0e-4  # the user's own choice stays
    (user / "old-card.yaml").write_text(yaml.safe_dump(old), encoding="utf-8")

    catalog = load_presets(user_dir=user)

    assert catalog.problems == []
    card = catalog.get("old-card")
    assert card.bands["1b_to_4b"].learning_rate == 2.0e-4
    assert card.bands["1b_to_4b"].warmup_ratio == 0.03
    assert card.bands["up_to_1b"].learning_rate == 7.0e-4
    (notice,) = catalog.notices
    assert "old-card.yaml" in notice and "learning_rate" in notice and "rtx" in notice
    # Loaded alone (no catalog to borrow from), the same file names the missing field.
    with pytest.raises(PresetError, match=r"bands\.1b_to_4b\.learning_rate: required"):
        load_preset_file(user / "old-card.yaml")
