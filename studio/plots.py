"""Every plotly figure the studio draws, in one place.

- `loss_figure`: train and eval loss against the step, one run or several overlaid (Train tab);
- `length_histogram`: tokens per row with the max-length cut (Dataset tab);
- `vram_figure`: the VRAM estimate's parts stacked against the card (Hardware tab).

Each takes plain data (log entries, token statistics, a `VramEstimate`) and returns a Figure;
plotly is imported only when a chart is drawn, so importing this module is cheap.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from studio.hardware.vram import VramEstimate

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d")


def loss_figure(curves: dict[str, list[dict[str, Any]]], title: str = "Loss"):
    """One colour per run: a solid train line and dashed eval markers of the same colour.

    `curves` maps a run label to its log entries (entries with kind "train" or "eval").
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (label, entries) in enumerate(curves.items()):
        color = PALETTE[i % len(PALETTE)]
        train = [e for e in entries if e.get("kind") == "train" and _finite(e.get("loss"))]
        evals = [e for e in entries if e.get("kind") == "eval" and _finite(e.get("eval_loss"))]
        if train:
            fig.add_trace(
                go.Scatter(
                    x=[e["step"] for e in train],
                    y=[e["loss"] for e in train],
                    mode="lines+markers" if len(train) < 40 else "lines",
                    name=f"{label} · train",
                    line={"color": color, "width": 2},
                    marker={"size": 5},
                )
            )
        if evals:
            fig.add_trace(
                go.Scatter(
                    x=[e["step"] for e in evals],
                    y=[e["eval_loss"] for e in evals],
                    mode="lines+markers",
                    name=f"{label} · eval",
                    line={"color": color, "width": 2, "dash": "dash"},
                    marker={"size": 8, "symbol": "diamond"},
                )
            )
    empty = not fig.data
    fig.update_layout(
        title=title,
        xaxis_title="step",
        yaxis_title="loss",
        template="plotly_white",
        height=360,
        margin={"l": 50, "r": 20, "t": 50, "b": 40},
        legend={"orientation": "h", "y": -0.2},
    )
    if empty:
        fig.add_annotation(
            text="No steps logged yet",
            showarrow=False,
            xref="paper",
            yref="paper",
            x=0.5,
            y=0.5,
            font={"size": 16, "color": "#6b7280"},
        )
    return fig


def length_histogram(stats: dict[str, Any]) -> Any:
    """A histogram of token lengths (`studio.data.tokens.length_stats`) with the cut marked."""
    import plotly.graph_objects as go

    lengths = stats.get("lengths") or []
    max_len = stats.get("max_len")
    fig = go.Figure(
        go.Histogram(x=lengths, nbinsx=min(60, max(10, len(lengths) // 5)), name="rows")
    )
    if max_len:
        fig.add_vline(
            x=max_len,
            line_dash="dash",
            line_color="crimson",
            annotation_text=f"max length {max_len}",
            annotation_position="top right",
        )
    fig.update_layout(
        title="Tokens per row (chat template applied)",
        xaxis_title="tokens",
        yaxis_title="rows",
        bargap=0.05,
        template="plotly_white",
        height=320,
        margin={"l": 40, "r": 20, "t": 50, "b": 40},
        showlegend=False,
    )
    return fig


VRAM_COLORS = {
    "in_use": "#9e9e9e",
    "base": "#3b6fb6",
    "lora": "#8e5bd0",
    "activations": "#e0892b",
    "logits": "#d64b4b",
    "overhead": "#5a9e6f",
}


def vram_figure(estimate: VramEstimate, card_gb: float | None = None, title: str = "") -> Any:
    """A stacked bar of the estimate's parts against the card's memory (GiB)."""
    import plotly.graph_objects as go

    from studio.hardware.vram import GIB, HEADROOM, PART_LABELS

    bars = [("in_use", PART_LABELS["in_use"], estimate.in_use_bytes, "measured or typical")]
    bars += [(p.key, p.label, p.bytes, p.detail) for p in estimate.parts]
    fig = go.Figure()
    for key, label, size, detail in bars:
        if size <= 0:
            continue
        fig.add_trace(
            go.Bar(
                x=[size / GIB],
                y=["memory"],
                orientation="h",
                name=f"{label}: {size / GIB:.2f} GiB",
                marker_color=VRAM_COLORS.get(key, "#777777"),
                hovertext=[detail],
                hovertemplate="%{x:.2f} GiB<br>%{hovertext}<extra>" + label + "</extra>",
            )
        )
    if card_gb is None and estimate.capacity_bytes is not None:
        card_gb = estimate.capacity_bytes / GIB
    total_gib = (estimate.total_bytes + estimate.in_use_bytes) / GIB
    if card_gb:
        fig.add_vline(x=card_gb, line_color="black", line_width=3)
        fig.add_annotation(
            x=card_gb, y=1.0, yref="paper", text=f"{card_gb:.1f} GiB", showarrow=False, yshift=10
        )
        spare = card_gb - (card_gb - estimate.in_use_bytes / GIB) * HEADROOM
        fig.add_vline(x=spare, line_color="black", line_dash="dot", line_width=1)
    heading = title or f"Peak {total_gib:.1f} GiB incl. in use — {estimate.verdict}"
    fig.update_layout(
        barmode="stack",
        title={"text": heading},
        xaxis={"title": "GiB", "range": [0, max(total_gib, card_gb or 0) * 1.08 or 1]},
        yaxis={"showticklabels": False},
        height=300,
        margin={"l": 20, "r": 20, "t": 60, "b": 40},
        legend={"orientation": "h", "y": -0.35},
    )
    return fig


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
