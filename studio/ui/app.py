"""Assemble the studio's Blocks: each tab is built by its own function, then wired here.

Every tab module has the same split: `build_<tab>_tab(ctx)` creates its components inside the
open tab and returns them by name; `wire_<tab>_tab(ctx, components)` attaches the events.
Build order matters only for cross-tab events, so every tab is built first (registering the
components other tabs use in `ctx`, under names such as "model.name" or "train.batch_size"),
and only then is each tab wired, reaching into the others through `ctx`.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio import __version__
from studio.ui.chat import build_chat_tab, wire_chat_tab
from studio.ui.dataset_tab import build_dataset_tab, wire_dataset_tab
from studio.ui.export_section import build_export_section, wire_export_section
from studio.ui.hardware_tab import build_hardware_tab, wire_hardware_tab
from studio.ui.train_tab import build_train_tab, wire_train_tab

TITLE = "LoRA Studio"


def build_app() -> gr.Blocks:
    """Build (not launch) the studio UI."""
    ctx: dict[str, Any] = {}
    with gr.Blocks(title=TITLE) as demo:
        ctx["demo"] = demo
        gr.Markdown(
            f"# {TITLE}\nFine-tune a small LLM with LoRA/QLoRA on one GPU: "
            "load a dataset, check the hardware, train, then compare base and fine-tune. "
            f"<small>v{__version__}</small>"
        )
        with gr.Tabs() as tabs:
            ctx["tabs"] = tabs
            with gr.Tab("Dataset", id="dataset"):
                dataset = build_dataset_tab(ctx)
            with gr.Tab("Hardware", id="hardware"):
                hardware = build_hardware_tab(ctx)
            with gr.Tab("Train", id="train"):
                train = build_train_tab(ctx)
            with gr.Tab("Chat", id="chat"):
                chat = build_chat_tab(ctx)
                with gr.Accordion("Export", open=False):
                    export = build_export_section(ctx)
        wire_dataset_tab(ctx, dataset)
        wire_hardware_tab(ctx, hardware)
        wire_train_tab(ctx, train)
        wire_chat_tab(ctx, chat)
        wire_export_section(ctx, export)
    return demo
