"""Chat tab, the conversation: one message goes to both sides and streams into two panels.

Each side's history and the blind assignment live in gr.State; the panels only show them.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import gradio as gr

from studio import chat

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
        ui["clear"] = gr.Button("Clear")
    ui["stats"] = gr.Markdown("", elem_id="chat-stats")


def gen_inputs(ui: dict[str, Any]) -> list[Any]:
    """The generation sliders, in `generation_settings`' order."""
    return [ui[k] for k in ("temperature", "top_p", "max_new", "rep_pen", "seed")]


def fresh(ui: dict[str, Any], blind_on: bool) -> dict[Any, Any]:
    """Empty histories and panels; a new hidden assignment in blind mode."""
    a = chat.new_blind_assignment() if blind_on else {"A": "base", "B": "tuned"}
    labels = (BLIND_A, BLIND_B) if blind_on else (LABEL_A, LABEL_B)
    return {
        ui["hist"]: {"base": [], "tuned": []},
        ui["assign"]: a,
        ui["voted"]: False,
        ui["chat_a"]: gr.update(value=[], label=labels[0]),
        ui["chat_b"]: gr.update(value=[], label=labels[1]),
        ui["stats"]: "",
        ui["reveal"]: "",
    }


def reset_outputs(ui: dict[str, Any]) -> list[Any]:
    """What `fresh` fills."""
    return [ui[k] for k in ("hist", "assign", "voted", "chat_a", "chat_b", "stats", "reveal")]


def wire_conversation(ui: dict[str, Any], engine: chat.ChatEngine) -> None:
    send_inputs = [ui[k] for k in ("msg", "hist", "assign", "voted", "blind", "system")]
    send_inputs += gen_inputs(ui)
    send_outputs = [ui[k] for k in ("msg", "hist", "assign", "voted", "chat_a", "chat_b")]
    send_outputs += [ui["stats"], ui["reveal"]]
    for event in (ui["send"].click, ui["msg"].submit):
        event(
            partial(send, engine),
            send_inputs,
            send_outputs,
            concurrency_limit=1,
            concurrency_id="chat-gen",
        )
    ui["stop"].click(engine.stop, None, None, queue=False)
    ui["clear"].click(partial(fresh, ui), ui["blind"], reset_outputs(ui))

    def on_blind(blind_on: bool) -> dict[Any, Any]:
        return {**fresh(ui, blind_on), ui["vote_row"]: gr.update(visible=bool(blind_on))}

    ui["blind"].change(on_blind, ui["blind"], [*reset_outputs(ui), ui["vote_row"]])


def _panels(hist: dict[str, list], assign: dict[str, str]) -> tuple[list, list]:
    return list(hist[assign["A"]]), list(hist[assign["B"]])


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
    return " &nbsp;|&nbsp; ".join(parts)


def _send_problem(engine: chat.ChatEngine, gen: tuple[Any, ...]) -> tuple[Any, str | None]:
    """The generation settings, or why nothing can be sent now."""
    problem = chat.training_blocker()
    if not engine.loaded:
        problem = problem or "Nothing loaded yet: pick a run and press Load."
    settings = None
    try:
        settings = generation_settings(*gen)
    except chat.ChatError as exc:
        problem = problem or f"Generation settings: {exc}"
    return settings, problem


def send(
    engine: chat.ChatEngine, text, h, a, was_voted, blind_on, sys_prompt, *gen
) -> Iterator[tuple[Any, ...]]:
    """Stream both answers; yields (msg, hist, assign, voted, panel A, panel B, stats, reveal)."""
    text = (text or "").strip()
    if not text:
        yield gr.update(), h, a, was_voted, *_panels(h, a), gr.update(), gr.update()
        return
    settings, problem = _send_problem(engine, gen)
    if problem:
        gr.Warning(problem)
        yield gr.update(), h, a, was_voted, *_panels(h, a), f"**Error:** {problem}", gr.update()
        return
    reveal_text = gr.update()
    new_round = False
    if blind_on and was_voted:  # a vote ends a blind round: start a fresh one
        h = {"base": [], "tuned": []}
        a = chat.new_blind_assignment()
        was_voted, new_round, reveal_text = False, True, ""
    h = {side: [*h[side], {"role": "user", "content": text}] for side in SIDES}
    partial_text = {side: "" for side in SIDES}

    def view():
        shown = {
            side: h[side] + ([{"role": "assistant", "content": partial_text[side]}])
            for side in SIDES
        }
        return shown[a["A"]], shown[a["B"]]

    first_a, first_b = view()
    if new_round:  # hide the sides again
        first_a = gr.update(value=first_a, label=BLIND_A)
        first_b = gr.update(value=first_b, label=BLIND_B)
    yield "", h, a, was_voted, first_a, first_b, "Generating…", reveal_text
    order = (a["A"], a["B"])
    error = None
    try:
        for side, chunk in engine.compare_stream(h, settings, system=sys_prompt, order=order):
            partial_text[side] += chunk
            yield "", h, a, was_voted, *view(), gr.update(), gr.update()
    except chat.ChatError as exc:
        error = str(exc)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    for side in SIDES:
        answer = partial_text[side] or ("(stopped)" if engine.stopped else "")
        h[side] = [*h[side], {"role": "assistant", "content": answer}]
    line = f"**Error:** {error}" if error else _stats_line(engine, a)
    yield "", h, a, was_voted, *_panels(h, a), line, gr.update()
