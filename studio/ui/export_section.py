"""Export section, shown inside the Chat tab (placeholder until its issue lands)."""

from __future__ import annotations

from typing import Any

import gradio as gr


def build_export_section(ctx: dict[str, Any]) -> None:
    gr.Markdown("Export (merged model, GGUF, Ollama) is being built.")


def wire_export_section(ctx: dict[str, Any]) -> None:
    """Attach events that involve other tabs' components."""
