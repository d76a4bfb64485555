"""Assemble the studio's Blocks: each tab is built by its own function, then wired here.

Build order matters only for cross-tab events, so every tab first creates its components
(registering shared ones in `ctx` under names such as "model.name" or "train.batch_size"),
and only then does each tab's `wire_*` function attach events that reach into other tabs.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio import __version__
from studio.ui.chat_tab import build_chat_tab, wire_chat_tab
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
                build_dataset_tab(ctx)
            with gr.Tab("Hardware", id="hardware"):
                build_hardware_tab(ctx)
            with gr.Tab("Train", id="train"):
                build_train_tab(ctx)
            with gr.Tab("Chat", id="chat"):
                build_chat_tab(ctx)
                with gr.Accordion("Export", open=False):
                    build_export_section(ctx)
        for wire in (
            wire_dataset_tab,
            wire_hardware_tab,
            wire_train_tab,
            wire_chat_tab,
            wire_export_section,
        ):
            wire(ctx)
    return demo
