"""Chat tab: in a real browser, load a trained run and see two different answers; and the
tab's own handlers (real components, real model, no browser) when two tabs share the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_chat import TICKET, train_chat_run
from tests.ui_steps import load_run_in_chat


@pytest.mark.slow
@pytest.mark.browser
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
    # the app's own choice for this device: one pass, or A then B where fp32 makes it faster
    from studio.models import precision

    way = "A and B in one batched pass" if precision.cpu_bf16()[0] else "fp32 on this CPU"
    assert way in stats.inner_text(), stats.inner_text()

    answers = []
    for panel in ("#chat-a", "#chat-b"):
        answers.append(page.locator(f"{panel} [data-testid='bot']").last.inner_text().strip())
    assert all(answers), answers
    assert answers[0] != answers[1], answers
    for panel in ("#chat-a", "#chat-b"):  # each panel shows the user's message once
        assert page.locator(panel).get_by_text(TICKET).count() == 1


def _no_progress(*_a, **_k) -> None:
    pass


@pytest.mark.slow
def test_a_tab_is_told_when_another_tab_changed_the_model(studio_home: Path):
    """Tab 1 loads a run; tab 2 loads the base alone. Tab 1's Send must not answer from the
    model it did not pick: it says what is loaded now, and answers only on the next Send."""
    import gradio as gr

    from studio import chat
    from studio.ui.chat import conversation
    from studio.ui.chat.tab import build_chat_tab, do_load, do_load_base

    run_dir = train_chat_run(studio_home)
    ctx: dict = {}
    with gr.Blocks():
        ui = build_chat_tab(ctx)
    engine = ctx["chat.engine"]
    gen = (0, 1, 8, 1, 42)  # greedy, 8 new tokens
    empty = {"base": [], "tuned": []}
    plain = {"A": "base", "B": "tuned"}
    try:
        tab1 = do_load(
            ui, engine, str(run_dir), "", "", "", chat.PRECISION_AUTO, False, _no_progress
        )
        mine = tab1[ui["loaded"]]
        assert mine["has_adapter"], tab1[ui["status"]]
        tab2 = do_load_base(ui, engine, "", chat.PRECISION_AUTO, False, _no_progress)
        assert "no fine-tune loaded" in tab2[ui["status"]]
        assert tab2[ui["chat_b"]]["label"] == conversation.NO_TUNED_B

        out = list(
            conversation.send(ui, engine, TICKET, empty, plain, False, False, "", mine, *gen)
        )
        assert len(out) == 1  # no answer streamed
        note = out[0][ui["status"]]
        assert "another tab" in note and engine.info.base_model in note and run_dir.name in note
        adopted = out[0][ui["loaded"]]
        assert adopted == engine.current() and not adopted["has_adapter"]

        out = list(
            conversation.send(ui, engine, TICKET, empty, plain, False, False, "", adopted, *gen)
        )
        final = out[-1]
        assert final[ui["chat_a"]][-1]["role"] == "assistant" and final[ui["chat_a"]][-1]["content"]
        assert final[ui["chat_b"]] == []  # base alone: B has nothing to answer with
    finally:
        engine.unload()


def _streamed_together(ui: dict, frames: list[dict]) -> bool:
    """Whether some frame shows B's answer begun while A's was still unfinished."""
    final_a = frames[-1][ui["chat_a"]][-1]["content"]
    for frame in frames[:-1]:
        a, b = frame.get(ui["chat_a"]), frame.get(ui["chat_b"])
        both = isinstance(a, list) and isinstance(b, list) and a and b
        if both and b[-1]["content"] and a[-1]["content"] != final_a:
            return True
    return False


@pytest.mark.slow
def test_send_streams_both_panels_in_one_pass_and_says_so(studio_home: Path):
    """The Send handler (real components, real model): both panels fill during the same
    stream, and the stats line says the turn ran in one batched pass, or why it did not."""
    import gradio as gr

    from studio import chat
    from studio.ui.chat import conversation
    from studio.ui.chat.tab import build_chat_tab, do_load

    run_dir = train_chat_run(studio_home)
    ctx: dict = {}
    with gr.Blocks():
        ui = build_chat_tab(ctx)
    engine = ctx["chat.engine"]
    gen = (0, 1, 24, 1, 42)  # greedy, 24 new tokens
    empty = {"base": [], "tuned": []}
    plain = {"A": "base", "B": "tuned"}
    try:
        loaded = do_load(
            ui, engine, str(run_dir), "", "", "", chat.PRECISION_AUTO, False, _no_progress
        )
        mine = loaded[ui["loaded"]]
        engine.batch_sides = True  # batched even where the device would pick A then B
        frames = list(
            conversation.send(ui, engine, TICKET, empty, plain, False, False, "", mine, *gen)
        )

        assert _streamed_together(ui, frames), "the two panels did not stream at once"
        line = frames[-1][ui["stats"]]
        assert "tokens/s" in line and "A and B in one batched pass" in line, line

        engine.batch_sides = False
        frames = list(
            conversation.send(ui, engine, TICKET, empty, plain, False, False, "", mine, *gen)
        )
        line = frames[-1][ui["stats"]]
        assert "one side after the other (batching is turned off)" in line, line
        assert not _streamed_together(ui, frames)  # A was done before B started

        engine.batch_sides = None  # the default: the device decides, and the line says so
        frames = list(
            conversation.send(ui, engine, TICKET, empty, plain, False, False, "", mine, *gen)
        )
        line = frames[-1][ui["stats"]]
        fp32_cpu = str(engine.model.dtype) == "torch.float32"  # Chat's dtype on this CPU
        assert ("fp32 on this CPU" in line) is fp32_cpu, line
        assert ("A and B in one batched pass" in line) is not fp32_cpu, line
    finally:
        engine.batch_sides = None
        engine.unload()
