"""The whole journey a user takes, in Chromium against `python app.py` (issue: acceptance).

Load the bundled sample, see its validation summary and PII report, redact into a cleaned copy,
pick the CPU preset, train a short run, watch the loss chart, then load the run in Chat and see
base and fine-tuned answers differ. On failure the page screenshot lands in test-artifacts/
(conftest) and the app log is attached to the assertion message.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from studio import runs
from tests.ui_steps import load_run_in_chat, set_train_settings

pytestmark = [pytest.mark.slow, pytest.mark.browser]

PROMPT = "My parcel has not arrived after two weeks and tracking shows nothing. Please help."


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

    # 2. Hardware: the CPU preset fills the Train tab's fields.
    page.get_by_role("tab", name="Hardware", exact=True).click()
    page.locator("#hw-preset input").click()
    page.get_by_role("option", name=re.compile("^CPU")).first.click()
    expect(page.locator("#hw-verdict")).not_to_contain_text("Estimating", timeout=60_000)

    # 3. Train: a short run on the cleaned copy; the chart moves and the run finishes.
    page.get_by_role("tab", name="Train", exact=True).click()
    wanted = {
        "train-run-name": ("journey", "run_name: journey"),
        "train-max-steps": ("12", "max_steps: 12"),
        "train-batch-size": ("4", "batch_size: 4"),
        "train-grad-accum": ("1", "grad_accum: 1"),
        "train-max-seq-len": ("160", "max_seq_len: 160"),
        "train-learning-rate": ("0.002", "learning_rate: 0.002"),
        "train-val-fraction": ("0.05", "val_fraction: 0.05"),
    }
    yaml_box = set_train_settings(page, wanted)
    expect(yaml_box).to_contain_text("method: lora")  # filled by the CPU preset
    assert cleaned.name in yaml_box.inner_text()  # trains on the redacted copy

    page.locator("#train-start").click()
    expect(page.locator("#train-notice")).to_contain_text("Started", timeout=60_000)
    chart_traces = page.locator("#train-chart .scatterlayer .trace")
    progress = page.locator("#train-progress")
    deadline = time.time() + 600
    while time.time() < deadline and chart_traces.count() == 0:
        page.wait_for_timeout(1000)
    assert chart_traces.count() > 0, progress.inner_text()
    progress.get_by_text("Completed").wait_for(timeout=600_000)
    run_dir = Path(page.locator("#train-run-dir textarea").input_value())
    info = runs.run_info(run_dir)
    assert info.status == "completed"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    # 4. Chat: the run, one prompt, two different answers.
    page.get_by_role("tab", name="Chat", exact=True).click()
    load_run_in_chat(page, run_dir.name, max_new_tokens=32)
    page.locator("#chat-msg textarea").fill(PROMPT)
    page.get_by_role("button", name="Send", exact=True).click()
    stats = page.locator("#chat-stats")
    stats.get_by_text("tokens/s").or_(stats.get_by_text("Error")).first.wait_for(timeout=300_000)
    assert "Error" not in stats.inner_text(), stats.inner_text()
    answers = [
        page.locator(f"{panel} [data-testid='bot']").last.inner_text().strip()
        for panel in ("#chat-a", "#chat-b")
    ]
    assert all(answers), answers
    assert answers[0] != answers[1], answers
