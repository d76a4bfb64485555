"""Chat tab in a real browser: load a trained run, send one prompt, see two different answers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.test_chat import TICKET, train_chat_run

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_send_one_prompt_and_see_two_different_answers(start_app, page, studio_home: Path):
    run_dir = train_chat_run(studio_home)
    app = start_app()
    page.goto(app.url)
    page.get_by_role("tab", name="Chat").click()

    # the run list refreshes when the tab opens; pick the run trained for this test
    page.get_by_label("Run", exact=True).click()
    page.get_by_role("option", name=run_dir.name, exact=False).click()
    page.get_by_text("Generation settings (shared by A and B)").click()
    max_new = page.locator("#chat-max-new input[type=number]")
    max_new.fill("24")
    max_new.press("Enter")
    page.get_by_role("button", name="Load", exact=True).click()
    status = page.locator("#chat-status")
    loaded = status.get_by_text(re.compile("^Loaded "))
    loaded.or_(status.get_by_text("Error")).first.wait_for(timeout=180_000)
    assert "Loaded" in status.inner_text(), status.inner_text()
    assert run_dir.name in status.inner_text()

    page.locator("#chat-msg textarea").fill(TICKET)
    page.get_by_role("button", name="Send", exact=True).click()
    stats = page.locator("#chat-stats")
    stats.get_by_text("tokens/s").or_(stats.get_by_text("Error")).first.wait_for(timeout=300_000)
    assert "Error" not in stats.inner_text(), stats.inner_text()

    answers = []
    for panel in ("#chat-a", "#chat-b"):
        answers.append(page.locator(f"{panel} [data-testid='bot']").last.inner_text().strip())
    assert all(answers), answers
    assert answers[0] != answers[1], answers
    for panel in ("#chat-a", "#chat-b"):  # each panel shows the user's message once
        assert page.locator(panel).get_by_text(TICKET).count() == 1
