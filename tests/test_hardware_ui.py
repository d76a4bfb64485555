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


def _wait_verdict(page, pattern: str, timeout: int = 90_000) -> str:
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


def _pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


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
        first = _wait_verdict(page, "^. ?Fits:")
        detected = page.locator("#hw-detected").inner_text()
        assert "Preset:" in detected and "Precision:" in detected

        _pick(page, "hw-preset", "NVIDIA RTX 4060 8 GB")
        card = _wait_verdict(page, r"of 7\.5 GiB free")  # 8 GiB minus a typical desktop
        assert card != first
        page.wait_for_function(
            "() => /RTX 4060 8 GB/.test(document.querySelector('#hw-chart')?.innerText || '')",
            timeout=30_000,
        )

        _pick(page, "hw-model", "Llama-3.1-8B-Instruct · 8.0B")
        big = _wait_verdict(page, r"Base weights\s+5\.31")  # QLoRA: NF4 8B base
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
