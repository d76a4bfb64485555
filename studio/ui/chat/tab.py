"""Chat tab: the base model (A) and its fine-tune (B) side by side, from one loaded model.

A thin layer over `studio.chat`: pick a run (or checkpoint, or adapter folder), Load once,
and every message goes to both sides (`conversation`). Blind mode hides which panel is which
until the user votes (`blind`); batch compare scores a whole prompt set on both sides
(`batch`). This module builds the tab, wires it, and handles the run pickers and Load.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any

import gradio as gr

from studio import chat, runs
from studio.config import DEFAULT_MODEL
from studio.ui.chat.batch import build_batch, wire_batch
from studio.ui.chat.blind import build_votes, wire_pairs, wire_votes
from studio.ui.chat.conversation import build_conversation, fresh, reset_outputs, wire_conversation

FINAL_ADAPTER = "final adapter"


def _run_choices() -> list[tuple[str, str]]:
    try:
        chattable = runs.list_runs(chattable=True)
        return [(f"{r.name} · {r.method_words} · {r.status}", str(r.path)) for r in chattable]
    except Exception:
        return []


def _checkpoint_choices(run_path: str | None) -> list[tuple[str, str]]:
    choices = [(FINAL_ADAPTER, "")]
    if run_path:
        for ckpt in runs.adapter_checkpoints(run_path):
            choices.append((ckpt.relative_to(run_path).as_posix(), str(ckpt)))
    return choices


def build_chat_tab(ctx: dict[str, Any]) -> dict[str, Any]:
    """Create the tab's components inside the open gr.Tab; returns them by name.

    Registers the engine ("chat.engine"), the run picker ("chat.run") and the status line
    ("chat.status") in ctx.
    """
    from gradio.context import get_render_context

    ui: dict[str, Any] = {"tab": get_render_context()}
    ctx["chat.engine"] = chat.ChatEngine()
    gr.Markdown(
        "Compare the base model (**A**) with your fine-tune (**B**): one model is loaded, and"
        " the base side is the same weights with the adapter switched off."
    )
    _build_loader(ui)
    build_conversation(ui)
    build_votes(ui)
    build_batch(ui)
    ui["hist"] = gr.State({"base": [], "tuned": []})
    ui["assign"] = gr.State({"A": "base", "B": "tuned"})
    ui["voted"] = gr.State(False)
    ui["loaded"] = gr.State(None)  # what THIS tab loaded (engine.current()); tabs share a model
    ctx["chat.run"] = ui["run_dd"]
    ctx["chat.status"] = ui["status"]
    return ui


def _build_loader(ui: dict[str, Any]) -> None:
    """Run, checkpoint, adapter folder, base model, precision; Load and Unload."""
    with gr.Row():
        ui["run_dd"] = gr.Dropdown(label="Run", choices=_run_choices(), value=None, scale=3)
        ui["ckpt_dd"] = gr.Dropdown(
            label="Checkpoint", choices=_checkpoint_choices(None), value="", scale=2
        )
        ui["refresh"] = gr.Button("Refresh runs", scale=0, min_width=120)
    with gr.Row():
        ui["adapter_box"] = gr.Textbox(
            label="…or an adapter folder path",
            placeholder="/path/to/adapter (overrides the run picker)",
            scale=3,
        )
        ui["base_dd"] = gr.Dropdown(
            label="Base model (a run's own unless you change it; blank alone: the default)",
            choices=[DEFAULT_MODEL],
            value="",
            allow_custom_value=True,
            scale=3,
        )
        ui["precision"] = gr.Radio(
            list(chat.PRECISIONS),
            value=chat.PRECISION_AUTO,
            label="Base precision",
            info="As trained: 4-bit for QLoRA runs, 16-bit for LoRA runs",
            scale=2,
        )
    with gr.Row():
        ui["load"] = gr.Button("Load", variant="primary")
        ui["load_base"] = gr.Button("Load base model only")
        ui["unload"] = gr.Button("Unload")
    ui["status"] = gr.Markdown(
        "Nothing loaded yet: press **Load base model only** to see how the base model answers"
        " before any training, or pick a run and press **Load**.",
        elem_id="chat-status",
    )


def wire_chat_tab(ctx: dict[str, Any], ui: dict[str, Any]) -> None:
    """Attach the tab's events; the run list refreshes on page load, on opening the tab and
    when the Train tab says a run ended ("runs.refresh")."""
    engine: chat.ChatEngine = ctx["chat.engine"]
    _wire_loader(ui, engine)
    wire_conversation(ui, engine)
    wire_votes(ui, engine)
    wire_pairs(ui, ctx)
    wire_batch(ui, engine)
    run_dd = ui["run_dd"]
    refreshers = [ui["refresh"].click]
    if isinstance(ui["tab"], gr.Tab):
        refreshers.append(ui["tab"].select)
    if ctx.get("demo") is not None:
        refreshers.append(ctx["demo"].load)
    signal = ctx.get("runs.refresh")
    if signal is not None and hasattr(signal, "change"):
        refreshers.append(signal.change)
    for event in refreshers:
        event(refresh_runs, run_dd, run_dd)


def refresh_runs(current: str | None) -> Any:
    """The run picker's choices, keeping the current pick when it still exists."""
    choices = _run_choices()
    values = {v for _, v in choices}
    value = current if current in values else (choices[0][1] if choices else None)
    return gr.update(choices=choices, value=value)


def _on_run(run_path: str | None) -> tuple[Any, Any]:
    """A run was picked: its checkpoints, and its own base model."""
    base = ""
    with contextlib.suppress(runs.RunError):
        base = runs.open_run(run_path).base_model if run_path else ""
    return gr.update(choices=_checkpoint_choices(run_path), value=""), gr.update(value=base)


def _wire_loader(ui: dict[str, Any], engine: chat.ChatEngine) -> None:
    ui["run_dd"].change(_on_run, ui["run_dd"], [ui["ckpt_dd"], ui["base_dd"]])
    load_in = [ui[k] for k in ("run_dd", "ckpt_dd", "adapter_box", "base_dd", "precision")]
    outputs = [ui["status"], ui["loaded"], *reset_outputs(ui)]
    ui["load"].click(
        partial(do_load, ui, engine),
        [*load_in, ui["blind"]],
        outputs,
        concurrency_limit=1,
        concurrency_id="chat-load",
    )
    ui["load_base"].click(
        partial(do_load_base, ui, engine),
        [ui["base_dd"], ui["precision"], ui["blind"]],
        outputs,
        concurrency_limit=1,
        concurrency_id="chat-load",
    )
    ui["unload"].click(partial(do_unload, ui, engine), ui["blind"], outputs)


def _loaded_view(
    ui: dict[str, Any], engine: chat.ChatEngine, text: str, blind_on: bool
) -> dict[Any, Any]:
    """Status text, this tab's record of what is loaded now, and fresh panels."""
    now = engine.current()
    has_adapter = bool(now and now["has_adapter"])
    return {ui["status"]: text, ui["loaded"]: now, **fresh(ui, blind_on, has_adapter)}


def _info_text(info: chat.LoadInfo) -> str:
    text = info.summary()
    for w in info.warnings:
        text += f"\n\n**Warning:** {w}"
    return text


def do_load(
    ui: dict[str, Any],
    engine: chat.ChatEngine,
    run_path,
    ckpt,
    adapter_path,
    base,
    prec,
    blind_on,
    progress=gr.Progress(),  # noqa: B008
) -> dict[Any, Any]:
    """Load the picked adapter (on the base in memory when it is the same one); the panels
    start afresh either way, and the status says what is loaded after a failure too."""
    target = (adapter_path or "").strip() or ckpt or run_path
    if not target:
        text = (
            "Pick a run (or paste an adapter folder path), then press Load; or press Load base"
            " model only to see the base model first."
        )
        return _loaded_view(ui, engine, text, blind_on)
    try:
        info = engine.load(target, base or None, prec, progress=lambda m, f: progress(f, m))
        text = _info_text(info)
    except chat.ChatError as exc:
        text = f"**Error:** {exc}"
    except Exception as exc:  # the app must survive any loading failure
        text = f"**Error:** loading failed: {type(exc).__name__}: {exc}"
    return _loaded_view(ui, engine, text, blind_on)


def do_load_base(
    ui: dict[str, Any],
    engine: chat.ChatEngine,
    base,
    prec,
    blind_on,
    progress=gr.Progress(),  # noqa: B008
) -> dict[Any, Any]:
    """Load the base model alone (A only): the typed/picked name, else the default model."""
    try:
        info = engine.load_base_only(base or None, prec, progress=lambda m, f: progress(f, m))
        text = _info_text(info)
    except chat.ChatError as exc:
        text = f"**Error:** {exc}"
    except Exception as exc:  # the app must survive any loading failure
        text = f"**Error:** loading failed: {type(exc).__name__}: {exc}"
    return _loaded_view(ui, engine, text, blind_on)


def do_unload(ui: dict[str, Any], engine: chat.ChatEngine, blind_on: bool) -> dict[Any, Any]:
    """Unload and free memory; refused (and said so) while a batch compare runs."""
    try:
        engine.unload()
    except chat.ChatError as exc:
        gr.Warning(str(exc))
        return {ui["status"]: f"**Error:** {exc}"}
    return _loaded_view(ui, engine, "Unloaded: memory freed.", blind_on)
