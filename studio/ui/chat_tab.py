"""Chat tab (placeholder until its issue lands)."""

from __future__ import annotations

from typing import Any

import gradio as gr


def build_chat_tab(ctx: dict[str, Any]) -> None:
    """Create the tab's components inside the open gr.Tab; register shared ones in ctx."""
    gr.Markdown("The Chat tab is being built.")


def wire_chat_tab(ctx: dict[str, Any]) -> None:
    """Attach events that involve other tabs' components (all tabs exist by now)."""
