"""The model picker and a hub download in Chromium, the app's real download code talking to
the stand-in hub (tests/hub_server.py) through HF_ENDPOINT."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.hub_server import VALID_TOKEN, HubServer, standard_repos
from tests.test_hardware_ui import pick, wait_verdict
from tests.ui_steps import fill

PROGRESS = "#hw-download-progress"
PERCENT = re.compile(r"\[\s*(\d+)%\] ([\d.]+) MB of ([\d.]+) MB")


def progress_text(page) -> str:
    return page.locator(PROGRESS).inner_text()


def wait_progress(page, pattern: str, timeout: int = 60_000) -> str:
    return page.wait_for_function(
        """([sel, pat]) => {
            const text = document.querySelector(sel)?.innerText || '';
            return new RegExp(pat).test(text) ? text : false;
        }""",
        arg=[PROGRESS, pattern],
        timeout=timeout,
    ).json_value()


@pytest.mark.slow
@pytest.mark.browser
def test_picker_shows_fit_and_size_and_a_download_moves_cancels_and_resumes(
    start_app, page, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repos = standard_repos(weight_bytes=6 * 2**20)
    with HubServer(repos, rate_bps=0.5 * 2**20) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        app = start_app()
        page.goto(app.url)
        page.get_by_role("tab", name="Hardware", exact=True).click()
        wait_verdict(page, "^. ?Fits:")

        # The picker: fit per method on the chosen card, and the download size.
        pick(page, "hw-preset", "NVIDIA RTX 4060 8 GB")
        wait_verdict(page, r"of 7\.5 GiB free")
        llama = "Llama-3.1-8B-Instruct · 8.0B · 16.1 GB · LoRA ❌ QLoRA ✅ · gated"
        page.locator("#hw-model input").click()
        page.get_by_role("option", name=llama, exact=True).wait_for(timeout=30_000)
        twin = "Meta-Llama-3.1-8B-Instruct-bnb-4bit · 8.0B · 5.7 GB · 4-bit: QLoRA ✅"
        assert page.get_by_role("option", name=twin, exact=True).is_visible()
        page.get_by_role("option", name=llama, exact=True).click()
        info = page.locator("#hw-model-info")
        page.wait_for_function(
            "() => /download 16\\.1 GB/.test(document.querySelector('#hw-model-info').innerText)"
        )
        assert "gated" in info.inner_text() and "unsloth/Meta-Llama" in info.inner_text()

        # The Train tab has the same list, and its pick is the run's model.
        page.get_by_role("tab", name="Train", exact=True).click()
        assert "Llama-3.1-8B-Instruct" in page.locator("#train-model input").input_value()
        pick(page, "train-model", "Qwen3-4B · 4.0B · 8.1 GB · LoRA ❌ QLoRA ✅")
        page.get_by_role("tab", name="Hardware", exact=True).click()
        page.wait_for_function(
            "() => /Qwen\\/Qwen3-4B/.test(document.querySelector('#hw-model-info').innerText)"
        )

        # A download: bytes move, Cancel keeps them, Download again continues.
        fill(page, "hw-model", "studio-test/tiny-model")
        page.get_by_role("button", name="Download model", exact=True).click()
        first = wait_progress(page, r"\[\s*[1-9]\d?%\]")
        page.get_by_role("button", name="Cancel download", exact=True).click()
        wait_progress(page, "cancelled")
        partial = list((tmp_path / "hf" / "hub").rglob("*.incomplete"))
        assert partial and partial[0].stat().st_size > 0
        kept = partial[0].stat().st_size

        page.get_by_role("button", name="Download model", exact=True).click()
        seen = [wait_progress(page, r"\[\s*\d+%\]")]
        while "is on this machine" not in seen[-1]:
            page.wait_for_timeout(400)
            seen.append(progress_text(page))
        page.wait_for_function(  # the model's info now comes from its downloaded config.json
            "() => /config\\.json at/.test(document.querySelector('#hw-model-info').innerText)"
        )
        percents = [int(m.group(1)) for t in seen if (m := PERCENT.search(t))]
        assert percents and percents[0] > 0, seen  # continued, not started over
        assert f"bytes={kept}-" in [r["range"] for r in hub.requests]
        assert PERCENT.search(first) and "MB/s" in "".join([*seen, first])

        # A gated model: the steps; then a token pasted in the field opens it.
        fill(page, "hw-model", "studio-test/gated-model")
        page.get_by_role("button", name="Download model", exact=True).click()
        steps = wait_progress(page, "accept the licence")
        assert "read token" in steps and "hf auth login" in steps
        page.get_by_text("Hugging Face token (gated models").click()
        fill(page, "hw-token", VALID_TOKEN)
        page.get_by_role("button", name="Save token", exact=True).click()
        page.wait_for_function(
            "() => /Token stored for/.test(document.querySelector('#hw-token-status').innerText)"
        )
        assert VALID_TOKEN not in page.content()  # the field is cleared once stored
        page.get_by_role("button", name="Download model", exact=True).click()
        wait_progress(page, "gated-model is on this machine")
    assert VALID_TOKEN not in app.log()
