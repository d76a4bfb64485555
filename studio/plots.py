"""Loss charts: train and eval loss against the step, for one run or several overlaid.

Takes plain log entries (`studio.runs.load_log`, or the live job's history) and returns a
plotly Figure; plotly is imported only when a chart is drawn.
"""

from __future__ import annotations

import math
from typing import Any

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


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
