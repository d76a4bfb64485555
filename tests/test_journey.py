"""The whole journey a user takes, in Chromium against `python app.py` (issues: acceptance, 15).

The default click-through with no edits: load the bundled sample, see its validation summary
and PII report, redact into a cleaned copy, take the detected CPU preset, Start, watch the loss
chart, see every "Did it learn?" check green, then load the run in Chat and see base and
fine-tuned answers differ on held-out validation questions. On failure the page screenshot
lands in test-artifacts/ (conftest) and the app log is attached to the assertion message.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from studio import runs
from studio.chat import evaluate
from studio.train import checks
from tests.ui_steps import load_run_in_chat

pytestmark = [pytest.mark.slow, pytest.mark.browser]

HELD_OUT = 2  # validation questions asked in Chat (the run never trained on them)


def test_happy_path_from_dataset_to_chat(start_app, page, tmp_path: Path) -> None:
    app = start_app()
    try:
        _journey(app, page)
    except Exception as exc:
        artifacts = Path(__file__).resolve().parents[1] / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        (artifacts / "journey-app.log").write_text(app.log(), encoding="utf-8")
        raise AssertionError(f"{exc}\n--- app log (tail) ---\n{app.log()[-4000:]}") from exc


def _journey(app, page) -> None:
    page.goto(app.url)

    # 1. Dataset: the bundled sample, its summary and PII report, then a redacted copy.
    page.get_by_role("tab", name="Dataset", exact=True).click()
    page.get_by_role("button", name="Load the bundled sample", exact=True).click()
    expect(page.locator("#dataset-status")).to_contain_text("180 rows usable", timeout=120_000)
    expect(page.locator("#dataset-summary")).to_contain_text("messages (JSONL)")
    pii_report = page.locator("#dataset-pii")
    expect(pii_report).to_contain_text("6 possible PII findings", timeout=60_000)
    page.get_by_role("button", name="Redact into a cleaned copy", exact=True).click()
    clean = page.locator("#dataset-clean")
    expect(clean).to_contain_text("Cleaned copy written", timeout=60_000)
    expect(pii_report).to_contain_text("No PII found")
    cleaned = Path(clean.locator("code").first.inner_text())
    assert cleaned.is_file() and "[EMAIL]" in cleaned.read_text(encoding="utf-8")

    # 2. Hardware: the detected preset (CPU here) is already chosen and fills the Train tab.
    page.get_by_role("tab", name="Hardware", exact=True).click()
    expect(page.locator("#hw-preset input")).to_have_value(re.compile("^CPU"), timeout=60_000)
    expect(page.locator("#hw-verdict")).not_to_contain_text("Estimating", timeout=60_000)

    # 3. Train: Start with no edits; the plan says what the recipe is, the chart moves.
    page.get_by_role("tab", name="Train", exact=True).click()
    expect(page.locator("#train-plan")).to_contain_text("lr 1e-3", timeout=60_000)
    page.get_by_text("Advanced settings").click()
    page.get_by_text("Run config (YAML): the same run headless").click()
    assert cleaned.name in page.locator("#train-yaml").inner_text()  # trains on the copy
    page.locator("#train-start").click()
    expect(page.locator("#train-notice")).to_contain_text("Started", timeout=60_000)
    chart_traces = page.locator("#train-chart .scatterlayer .trace")
    progress = page.locator("#train-progress")
    deadline = time.time() + 900
    while time.time() < deadline and chart_traces.count() == 0:
        page.wait_for_timeout(1000)
    assert chart_traces.count() > 0, progress.inner_text()
    progress.get_by_text("Completed").wait_for(timeout=900_000)
    run_dir = Path(page.locator("#train-run-dir textarea").input_value())
    info = runs.open_run(run_dir)
    assert info.status == "completed"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    # Every "did it learn?" check is green, in the run's record and on the page.
    found = runs.read_metadata(run_dir).get("checks") or []
    verdicts = {c["name"]: checks.verdict_of(c) for c in found}
    assert verdicts and set(verdicts.values()) == {"green"}, verdicts
    result = page.locator("#train-result")
    expect(result).to_contain_text("Did it learn?")
    for name in verdicts:
        expect(result).to_contain_text(f"{checks.MARKS['green']} {name}")

    # 4. Chat: held-out validation questions; base and fine-tune answer differently.
    page.get_by_role("tab", name="Chat", exact=True).click()
    load_run_in_chat(page, run_dir.name, max_new_tokens=96)
    stats = page.locator("#chat-stats")
    for item in evaluate.validation_items(run_dir, limit=HELD_OUT):
        question = item.messages[-1]["content"]
        page.locator("#chat-msg textarea").fill(question)
        page.get_by_role("button", name="Send", exact=True).click()
        page.locator("#chat-b [data-testid='bot']").last.wait_for(timeout=60_000)
        stats.get_by_text("tokens/s").or_(stats.get_by_text("Error")).first.wait_for(
            timeout=300_000
        )
        assert "Error" not in stats.inner_text(), stats.inner_text()
        answers = [
            page.locator(f"{panel} [data-testid='bot']").last.inner_text().strip()
            for panel in ("#chat-a", "#chat-b")
        ]
        assert all(answers), answers
        assert answers[0] != answers[1], (question, answers)
        page.locator("#chat-clear").click()
        expect(stats).not_to_contain_text("tokens/s")  # the next turn's figures are its own
