"""Browser steps that several UI tests take the same way (Playwright pages of the real app)."""

from __future__ import annotations

import re
from typing import Any

import pytest


def fill(page: Any, elem_id: str, value: str) -> None:
    """Type into the input of a Gradio component by its elem_id and leave it (commits it)."""
    box = page.locator(f"#{elem_id}").locator("input, textarea").first
    box.fill(value)
    box.press("Tab")


def set_train_settings(page: Any, wanted: dict[str, tuple[str, str]]) -> Any:
    """Fill Train-tab fields {elem_id: (value, expected YAML line)} once and wait until the run
    config shows them all; returns the YAML box. Typed once, not retried: the page-load preset
    fill must leave typed fields alone (a retry here once hid that it overwrote them)."""
    page.get_by_text("Advanced settings").click()
    page.get_by_text("Run config (YAML): the same run headless").click()
    yaml_box = page.locator("#train-yaml")
    for elem_id, (value, _line) in wanted.items():
        fill(page, elem_id, value)
    for _ in range(20):
        page.wait_for_timeout(1500)
        text = yaml_box.inner_text()
        if all(line in text for _value, line in wanted.values()):
            return yaml_box
    pytest.fail(f"settings did not stick:\n{yaml_box.inner_text()}")


def load_run_in_chat(page: Any, run_name: str, max_new_tokens: int) -> str:
    """On the Chat tab: pick the run, set the answer length, Load; returns the status text."""
    page.get_by_label("Run", exact=True).click()
    page.get_by_role("option", name=run_name, exact=False).click()
    page.get_by_text("Generation settings (shared by A and B)").click()
    max_new = page.locator("#chat-max-new input[type=number]")
    max_new.fill(str(max_new_tokens))
    max_new.press("Enter")
    page.get_by_role("button", name="Load", exact=True).click()
    status = page.locator("#chat-status")
    loaded = status.get_by_text(re.compile("^Loaded "))
    loaded.or_(status.get_by_text("Error")).first.wait_for(timeout=180_000)
    text = status.inner_text()
    assert "Loaded" in text, text
    return text
