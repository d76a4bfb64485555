"""The default DPO click-through in Chromium against `python app.py` (issue 28): look at the
bundled preference sample in the Dataset tab (its pair preview shows chosen and rejected),
take the detected CPU preset, Start with no edits, and see the run finish with every "Did it
learn?" check green and the held-out reward accuracy risen."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from studio import runs
from studio.train import checks

pytestmark = [pytest.mark.slow, pytest.mark.browser]

BUDGET_S = 600  # the bar is 5 min on this CPU; the test allows for a loaded machine


def test_default_dpo_click_through(start_app, page) -> None:
    app = start_app()
    try:
        _click_through(page, app.url)
    except Exception as exc:
        raise AssertionError(f"{exc}\n--- app log (tail) ---\n{app.log()[-4000:]}") from exc


def _click_through(page, url: str) -> None:
    page.goto(url)
    # Dataset: the preference sample loads clean, and a pair previews both of its answers.
    page.get_by_role("tab", name="Dataset", exact=True).click()
    page.locator("#dataset-sample-pref").click()
    expect(page.locator("#dataset-status")).to_contain_text("60 rows usable", timeout=120_000)
    expect(page.locator("#dataset-summary")).to_contain_text("Preference pairs")
    expect(page.locator("#dataset-pii")).to_contain_text("No PII found", timeout=60_000)
    page.get_by_role("button", name="Show preview", exact=True).click()
    preview = page.locator("#dataset-preview")
    expect(preview).to_contain_text("── rejected ──", timeout=60_000)
    expect(preview).to_contain_text('"category"')

    # Hardware: the detected CPU preset; Train: loading pairs chose DPO and the DPO recipe.
    page.get_by_role("tab", name="Hardware", exact=True).click()
    expect(page.locator("#hw-preset input")).to_have_value(re.compile("^CPU"), timeout=60_000)
    page.get_by_role("tab", name="Train", exact=True).click()
    expect(page.locator("#train-objective input")).to_have_value("dpo", timeout=30_000)
    expect(page.locator("#train-plan")).to_contain_text("~12 steps", timeout=60_000)
    t0 = time.time()
    page.locator("#train-start").click()
    expect(page.locator("#train-notice")).to_contain_text("Started", timeout=60_000)
    page.locator("#train-progress").get_by_text("Completed").wait_for(timeout=BUDGET_S * 1000)
    took = time.time() - t0
    run_dir = Path(page.locator("#train-run-dir textarea").input_value())

    meta = runs.read_metadata(run_dir)
    assert meta["objective"] == "dpo" and meta["starts_from"]["kind"] == "base"
    figures = meta["did_it_learn"]["preference"]
    assert figures["reward_accuracy"] > figures["reward_accuracy_before"], figures
    verdicts = {c["name"]: checks.verdict_of(c) for c in meta["checks"]}
    assert set(verdicts.values()) == {"green"}, (verdicts, meta["checks"])
    result = page.locator("#train-result")
    expect(result).to_contain_text(f"{checks.MARKS['green']} reward accuracy rose")
    print(f"DPO click-through: Start -> Completed in {took:.0f} s, {figures}")
