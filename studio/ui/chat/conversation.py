"""Chat tab, the conversation: one message goes to both sides and streams into two panels.

Each side's history and the blind assignment live in gr.State; the panels only show them.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import gradio as gr

from studio import chat, gpu

LABEL_A = "A · base"
LABEL_B = "B · fine-tuned"
BLIND_A = "A (hidden)"
BLIND_B = "B (hidden)"
SIDES = ("base", "tuned")


def generation_settings(temperature, top_p, max_new_tokens, repetition_penalty, seed):
    """The shared sliders as validated settings (raises ChatError for a bad value)."""
    return chat.GenerationSettings(
        temperature=float(temperature or 0),
        top_p=float(top_p or 1),
        max_new_tokens=int(max_new_tokens or 1),
        repetition_penalty=float(repetition_penalty or 1),
        seed=int(seed or 0),
    ).validate()


def build_conversation(ui: dict[str, Any]) -> None:
    """System prompt, generation settings, the two panels, the message box and its buttons."""
    ui["system"] = gr.Textbox(
        label="System prompt (blank: the template's default)",
        lines=2,
        placeholder="e.g. the system prompt your dataset used",
    )
    with gr.Accordion("Generation settings (shared by A and B)", open=False), gr.Row():
        ui["temperature"] = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
        ui["top_p"] = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
        ui["max_new"] = gr.Slider(
            1, 2048, value=256, step=1, label="Max new tokens", elem_id="chat-max-new"
        )
        ui["rep_pen"] = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")
        ui["seed"] = gr.Number(value=42, precision=0, label="Seed")
    ui["blind"] = gr.Checkbox(
        label="Blind mode: hide which side is which until you vote",
        value=False,
    )
    with gr.Row():
        ui["chat_a"] = gr.Chatbot(label=LABEL_A, height=420, elem_id="chat-a")
        ui["chat_b"] = gr.Chatbot(label=LABEL_B, height=420, elem_id="chat-b")
    ui["msg"] = gr.Textbox(
        label="Message (sent to both sides)",
        lines=2,
        placeholder="Type a message, then press Send",
        elem_id="chat-msg",
    )
    with gr.Row():
        ui["send"] = gr.Button("Send", variant="primary")
        ui["stop"] = gr.Button("Stop", variant="stop")
        ui["clear"] = gr.Button("Clear", elem_id="chat-clear")
    ui["stats"] = gr.Markdown("", elem_id="chat-stats")


def gen_inputs(ui: dict[str, Any]) -> list[Any]:
    """The generation sliders, in `generation_settings`' order."""
    return [ui[k] for k in ("temperature", "top_p", "max_new", "rep_pen", "seed")]


NO_TUNED_B = "B · no fine-tune loaded"
NO_TUNED_NOTE = "No fine-tune loaded: pick a run and press Load to compare it with the base."


def fresh(ui: dict[str, Any], blind_on: bool, has_adapter: bool = True) -> dict[Any, Any]:
    """Empty histories and panels; a new hidden assignment in blind mode. With a base loaded
    alone, panel B says plainly that there is no fine-tune to answer."""
    a = chat.new_blind_assignment() if blind_on and has_adapter else {"A": "base", "B": "tuned"}
    labels = (BLIND_A, BLIND_B) if blind_on and has_adapter else (LABEL_A, LABEL_B)
    b_panel = gr.update(value=[], label=labels[1], placeholder=None)
    if not has_adapter:
        b_panel = gr.update(value=[], label=NO_TUNED_B, placeholder=NO_TUNED_NOTE)
    return {
        ui["hist"]: {"base": [], "tuned": []},
        ui["assign"]: a,
        ui["voted"]: False,
        ui["chat_a"]: gr.update(value=[], label=labels[0]),
        ui["chat_b"]: b_panel,
        ui["stats"]: "",
        ui["reveal"]: "",
    }


def reset_outputs(ui: dict[str, Any]) -> list[Any]:
    """What `fresh` fills."""
    return [ui[k] for k in ("hist", "assign", "voted", "chat_a", "chat_b", "stats", "reveal")]


def model_changed(engine: chat.ChatEngine, mine: dict[str, Any] | None) -> str | None:
    """Why this tab must not answer now: the model it loaded is not the one in memory.

    Two browser tabs share one Chat model; each tab keeps what it loaded (`mine`, a gr.State
    of `engine.current()`), so an answer never comes from a model this tab's user did not pick.
    """
    now = engine.current()
    if now is None:
        if mine is None:
            return "Nothing loaded yet: press Load base model only, or pick a run and press Load."
        why = f" ({engine.unload_reason})" if engine.unload_reason else ""
        return f"The Chat model you loaded ({mine['label']}) was unloaded{why}. Load it again."
    if mine is not None and mine.get("id") == now["id"]:
        return None
    yours = f", not {mine['label']} which you loaded here" if mine else ""
    return (
        f"The Chat model was changed in another tab or window: **{now['label']}** is loaded"
        f" now{yours}."
    )


def send_outputs(ui: dict[str, Any]) -> list[Any]:
    """What `send` fills."""
    keys = ("msg", "hist", "assign", "voted", "chat_a", "chat_b", "stats", "reveal")
    return [ui[k] for k in (*keys, "loaded", "status")]


def wire_conversation(ui: dict[str, Any], engine: chat.ChatEngine) -> None:
    send_inputs = [ui[k] for k in ("msg", "hist", "assign", "voted", "blind", "system", "loaded")]
    send_inputs += gen_inputs(ui)
    for event in (ui["send"].click, ui["msg"].submit):
        event(
            partial(send, ui, engine),
            send_inputs,
            send_outputs(ui),
            concurrency_limit=1,
            concurrency_id="chat-gen",
        )
    ui["stop"].click(engine.stop, None, None, queue=False)

    def on_clear(blind_on: bool, mine: dict[str, Any] | None) -> dict[Any, Any]:
        return fresh(ui, blind_on, bool(mine and mine["has_adapter"]))

    ui["clear"].click(on_clear, [ui["blind"], ui["loaded"]], reset_outputs(ui))

    def on_blind(blind_on: bool, mine: dict[str, Any] | None) -> dict[Any, Any]:
        out = fresh(ui, blind_on, bool(mine and mine["has_adapter"]))
        return {**out, ui["vote_row"]: gr.update(visible=bool(blind_on))}

    ui["blind"].change(on_blind, [ui["blind"], ui["loaded"]], [*reset_outputs(ui), ui["vote_row"]])


def _stats_line(engine: chat.ChatEngine, assign: dict[str, str]) -> str:
    parts = []
    for panel in ("A", "B"):
        st = engine.last_stats.get(assign[panel])
        if st is None:
            continue
        ttft = f"{st.ttft_s:.2f} s" if st.ttft_s is not None else "–"
        note = " · stopped" if st.stopped else (" · hit max new tokens" if st.hit_limit else "")
        parts.append(
            f"**{panel}**: {st.new_tokens} tokens, first token {ttft},"
            f" {st.tokens_per_s:.1f} tokens/s{note}"
        )
    line = " &nbsp;|&nbsp; ".join(parts)
    if parts and engine.last_mode:  # batched, or one after the other and why
        line += f" &nbsp;·&nbsp; _{engine.last_mode}_"
    return line


def _send_problem(
    engine: chat.ChatEngine, mine: dict[str, Any] | None, blind_on: bool, gen: tuple[Any, ...]
) -> tuple[Any, str | None]:
    """The generation settings, or why nothing can be sent now."""
    problem = gpu.training_blocker()
    if not problem and mine is not None and not mine["has_adapter"] and blind_on:
        problem = "Blind mode needs a fine-tune to hide: pick a run and press Load."
    settings = None
    try:
        settings = generation_settings(*gen)
    except chat.ChatError as exc:
        problem = problem or f"Generation settings: {exc}"
    return settings, problem


def _adopt(ui: dict[str, Any], engine: chat.ChatEngine, notice: str, blind_on: bool):
    """Another tab changed the model: say which one is loaded, and take it as this tab's."""
    now = engine.current()
    label = now["label"] if now else ""
    notice += (
        f" This conversation was cleared; press Send again to chat with {label}, or load"
        " your pick again."
    )
    gr.Warning(notice.replace("**", ""))
    status = f"**Note:** {notice}"
    if engine.info is not None and now is not None:
        status += f"\n\n{engine.info.summary()}"
    out = fresh(ui, blind_on, bool(now and now["has_adapter"]))
    return {**out, ui["msg"]: gr.update(), ui["loaded"]: now, ui["status"]: status}


def send(
    ui: dict[str, Any],
    engine: chat.ChatEngine,
    text,
    h,
    a,
    was_voted,
    blind_on,
    sys_prompt,
    mine,
    *gen,
) -> Iterator[dict[Any, Any]]:
    """Stream both answers (A only with a base loaded alone) into the two panels."""
    text = (text or "").strip()
    if not text:
        yield {ui["msg"]: gr.update()}
        return
    notice = model_changed(engine, mine)
    if notice:
        if engine.current() is None:
            yield {ui["stats"]: f"**Error:** {notice}"}
        else:
            yield _adopt(ui, engine, notice, blind_on)
        return
    settings, problem = _send_problem(engine, mine, blind_on, gen)
    if problem:
        gr.Warning(problem)
        yield {ui["stats"]: f"**Error:** {problem}"}
        return
    yield from _answer(ui, engine, text, h, a, was_voted, blind_on, sys_prompt, settings, mine)


def _answer(
    ui: dict[str, Any],
    engine: chat.ChatEngine,
    text: str,
    h: dict[str, list],
    a: dict[str, str],
    was_voted: bool,
    blind_on: bool,
    sys_prompt: str,
    settings: chat.GenerationSettings,
    mine: dict[str, Any],
) -> Iterator[dict[Any, Any]]:
    """One turn: the user's message to each side that can answer, streamed."""
    sides = SIDES if mine["has_adapter"] else ("base",)
    out: dict[Any, Any] = {ui["msg"]: ""}
    if blind_on and was_voted:  # a vote ends a blind round: start a fresh one
        h = {"base": [], "tuned": []}
        a = chat.new_blind_assignment()
        was_voted = False
        out[ui["reveal"]] = ""
    h = {
        side: [*h[side], {"role": "user", "content": text}] if side in sides else h[side]
        for side in SIDES
    }
    partial_text = {side: "" for side in SIDES}

    def view() -> tuple[list, list]:
        shown = {
            side: h[side] + ([{"role": "assistant", "content": partial_text[side]}])
            if side in sides
            else []
            for side in SIDES
        }
        return shown[a["A"]], shown[a["B"]]

    first_a, first_b = view()
    if ui["reveal"] in out:  # a new blind round: hide the sides again
        first_a = gr.update(value=first_a, label=BLIND_A)
        first_b = gr.update(value=first_b, label=BLIND_B)
    out.update({ui["hist"]: h, ui["assign"]: a, ui["voted"]: was_voted})
    yield {**out, ui["chat_a"]: first_a, ui["chat_b"]: first_b, ui["stats"]: "Generating…"}
    order = tuple(side for side in (a["A"], a["B"]) if side in sides)
    error = None
    try:
        for side, chunk in engine.compare_stream(h, settings, system=sys_prompt, order=order):
            partial_text[side] += chunk
            panel_a, panel_b = view()
            yield {ui["chat_a"]: panel_a, ui["chat_b"]: panel_b}
    except chat.ChatError as exc:
        error = str(exc)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    for side in sides:
        answer = partial_text[side] or ("(stopped)" if engine.stopped else "")
        h[side] = [*h[side], {"role": "assistant", "content": answer}]
    line = f"**Error:** {error}" if error else _stats_line(engine, a)
    shown = {side: list(h[side]) if side in sides else [] for side in SIDES}
    panel_a, panel_b = shown[a["A"]], shown[a["B"]]
    yield {ui["hist"]: h, ui["chat_a"]: panel_a, ui["chat_b"]: panel_b, ui["stats"]: line}
