"""The Hardware tab in Chromium: detection, a preset and a model change the fit verdict."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from studio.hardware.presets import REPO_PRESETS

VERDICT = "#hw-verdict"


def test_cpu_estimate_follows_the_precision_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hardware tab's CPU estimate asks the engine, which asks the one precision rule."""
    from studio.hardware.detect import estimate_kernel
    from studio.models import precision

    assert estimate_kernel("cuda") == estimate_kernel("cuda:1") == "cuda"
    monkeypatch.setenv(precision.CPU_FP32_ENV, "1")
    assert estimate_kernel("cpu") == "cpu"
    monkeypatch.delenv(precision.CPU_FP32_ENV)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert estimate_kernel("cpu") == "cpu-bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    assert estimate_kernel("cpu") == "cpu"


def _wiring():
    """The tab's wiring with names standing in for the components (handlers key by them)."""
    from studio.ui.hardware_tab import SETTING_FIELDS, WATCHED_FIELDS, HardwareWiring

    names = ("preset", "model", "settings", "report", "model_info", "verdict", "chart")
    train = {k: f"train.{k}" for k in SETTING_FIELDS}
    watched = {k: f"train.{k}" for k in WATCHED_FIELDS}
    return HardwareWiring({n: n for n in names}, train, "edited", "note", watched)


def test_the_estimate_follows_the_train_tabs_long_context_switches() -> None:
    """The 🧩 lines and the verdict are the run's: the Train tab's switches reach the
    estimate (a 12 GB card, Llama-3.1-8B QLoRA at 16k tokens), and no preset fill sets them."""
    from studio.ui.hardware_tab import on_pick, on_settings_change

    w = _wiring()
    run = {"method": "qlora", "batch_size": 1, "grad_accum": 1, "max_seq_len": 16_384,
           "gradient_checkpointing": True, "optimizer": "paged_adamw_8bit", "lora_r": 32,
           "lora_alpha": 64, "lora_dropout": 0.05, "target_modules": "all_linear"}  # fmt: skip
    values = {"preset": "rtx3060-12gb", "model": "meta-llama/Llama-3.1-8B-Instruct"}
    values |= {"settings": {}, "report": None, "edited": []}
    values |= {f"train.{k}": v for k, v in run.items()}

    def verdict(**switches: str) -> str:
        return on_settings_change(w, values | {f"train.{k}": v for k, v in switches.items()})[
            "verdict"
        ]

    off = verdict(activation_offloading="off", liger_kernels="off", tiled_mlp="off")
    assert "🧩 Tiled MLP off: off in the run's settings" in off
    assert "🧩 Activation offloading off: off in the run's settings" in off
    assert "won't fit" in off.lower()
    tiled = verdict(activation_offloading="on", liger_kernels="off", tiled_mlp="on")
    assert "🧩 Tiled MLP on: on in the run's settings" in tiled
    assert "won't fit" not in tiled.lower()
    filled = on_pick(w, values | {"train.tiled_mlp": "off"})
    assert not any(k in filled for k in w.watched.values())  # a fill leaves the switches


def test_an_automatic_fill_keeps_typed_fields_and_a_pick_replaces_them_saying_so() -> None:
    """The rule of the Train fields: detection's fill leaves what the user typed; a preset
    the user picks fills everything and names what it replaced; the pick's repeat is quiet."""
    import gradio as gr

    from studio.ui.hardware_tab import _fill_outputs, on_pick
    from studio.ui.train_tab import mark_edited

    cpu = yaml.safe_load((REPO_PRESETS / "cpu.yaml").read_text(encoding="utf-8"))
    band = cpu["bands"]["up_to_1b"]  # the default 135M model's band
    assert (band["max_seq_len"], band["grad_accum"]) != (160, 1)  # else nothing would show
    w = _wiring()
    typed: list[str] = []
    for name in ("max_seq_len", "grad_accum"):
        assert mark_edited(name, typed) is typed  # in place: a running handler sees it
    fields = {f"train.{k}": v for k, v in {"max_seq_len": 160, "grad_accum": 1}.items()}
    values = {"preset": "cpu", "model": None, "settings": {}, "report": None, "edited": typed}
    values.update(fields)

    auto = _fill_outputs(w, values, None, picked=False)
    assert auto["train.max_seq_len"] == auto["train.grad_accum"] == gr.skip()
    assert auto["train.lora_r"] == band["lora_r"] and auto["train.method"] == band["method"]
    assert "detected preset" in auto["note"] and "max_seq_len" in auto["note"]
    assert auto["verdict"] == gr.skip()  # estimated after, from the fields as they are

    picked = on_pick(w, values)
    assert (picked["train.max_seq_len"], picked["train.grad_accum"]) == (
        band["max_seq_len"],
        band["grad_accum"],
    )
    assert f"max_seq_len` 160 → {band['max_seq_len']}" in picked["note"]
    assert f"grad_accum` 1 → {band['grad_accum']}" in picked["note"]
    assert typed == []  # filled on request: the fields are the preset's again
    assert "GiB" in picked["verdict"]  # estimated with the filled settings
    repeat = on_pick(w, {**values, "settings": picked["settings"]})
    assert repeat["note"] == gr.skip()  # the same pick again: the note of the first stays


def wait_verdict(page, pattern: str, timeout: int = 90_000) -> str:
    """The verdict once it matches and no estimate is still running (Gradio then prefixes
    the old text with its progress timer, e.g. "processing | 0.3/0.4s")."""
    return page.wait_for_function(
        r"""([sel, pat]) => {
            const text = (document.querySelector(sel)?.innerText || '').trim();
            const busy = /^(processing|[0-9.\/]+s\b)/.test(text);
            return new RegExp(pat).test(text) && !busy ? text : false;
        }""",
        arg=[VERDICT, pattern],
        timeout=timeout,
    ).json_value()


def pick(page, elem_id: str, option: str | re.Pattern) -> None:
    page.locator(f"#{elem_id} input").click()
    if isinstance(option, str):
        page.get_by_role("option", name=option, exact=True).click()
    else:
        page.get_by_role("option", name=option).click()


@pytest.mark.slow
@pytest.mark.browser
def test_preset_and_model_change_the_verdict(start_app, page, studio_home: Path) -> None:
    user_dir = studio_home / "presets"
    user_dir.mkdir(exist_ok=True)
    mine = yaml.safe_load((REPO_PRESETS / "rtx3060-12gb.yaml").read_text(encoding="utf-8"))
    mine.update(name="test-card-10gb", label="Test card 10 GB", vram_gb=10, match=[])
    user_file = user_dir / "test-card.yaml"
    user_file.write_text(yaml.safe_dump(mine), encoding="utf-8")
    try:
        app = start_app()
        page.goto(app.url)
        page.get_by_role("tab", name="Hardware", exact=True).click()
        # Detection runs on page load and picks a preset; its estimate appears. The detected
        # preset's defaults for the 135M default model fit any machine the studio runs on.
        first = wait_verdict(page, "^. ?Fits:")
        detected = page.locator("#hw-detected").inner_text()
        assert "Preset:" in detected and "Precision:" in detected

        pick(page, "hw-preset", "NVIDIA RTX 4060 8 GB")
        card = wait_verdict(page, r"of 7\.5 GiB free")  # 8 GiB minus a typical desktop
        assert card != first
        page.wait_for_function(
            "() => /RTX 4060 8 GB/.test(document.querySelector('#hw-chart')?.innerText || '')",
            timeout=30_000,
        )

        pick(page, "hw-model", re.compile(r"^Llama-3\.1-8B-Instruct · 8\.0B · "))
        big = wait_verdict(page, r"Base weights\s+5\.31")  # QLoRA: NF4 8B base
        assert "4B to 9B band" in page.locator("#hw-model-info").inner_text()
        # The 4B-9B band's QLoRA defaults fit an 8 GB card (tests/test_presets.py checks it).
        assert re.search(r"^. ?Fits:", big), big

        page.locator("#hw-preset input").click()
        assert page.get_by_role("option", name="Test card 10 GB (yours)", exact=True).is_visible()
        page.keyboard.press("Escape")
        # Opening the list changed nothing: the 8B estimate on the RTX 4060 still shows.
        assert page.locator(VERDICT).inner_text() == big
        assert "RTX 4060 8 GB" in page.locator("#hw-chart").inner_text()
    finally:
        user_file.unlink(missing_ok=True)
