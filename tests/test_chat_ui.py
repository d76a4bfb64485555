"""Chat tab in a real browser: load a trained run, send one prompt, see two different answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_chat import TICKET, train_chat_run
from tests.ui_steps import load_run_in_chat

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_send_one_prompt_and_see_two_different_answers(start_app, page, studio_home: Path):
    run_dir = train_chat_run(studio_home)
    app = start_app()
    page.goto(app.url)
    page.get_by_role("tab", name="Chat").click()

    # the run list refreshes when the tab opens; pick the run trained for this test
    assert run_dir.name in load_run_in_chat(page, run_dir.name, max_new_tokens=24)

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
