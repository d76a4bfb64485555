"""Chat tab, blind mode: vote on two hidden answers, then see which side was which.

Votes are saved with the run (`studio.chat.evaluate.record_blind_vote`), and the tally gives
the adapter's win rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from studio import chat
from studio.ui.chat.conversation import SIDES


def build_votes(ui: dict[str, Any]) -> None:
    """The vote buttons (shown in blind mode) and the reveal line."""
    with gr.Row(visible=False) as ui["vote_row"]:
        ui["vote_a"] = gr.Button("A is better")
        ui["vote_tie"] = gr.Button("Tie")
        ui["vote_b"] = gr.Button("B is better")
    ui["reveal"] = gr.Markdown("", elem_id="chat-reveal")


def wire_votes(ui: dict[str, Any], engine: chat.ChatEngine) -> None:
    inputs = [ui["hist"], ui["assign"], ui["voted"], ui["blind"], ui["loaded"]]
    outputs = [ui["reveal"], ui["voted"], ui["chat_a"], ui["chat_b"]]
    for key, which in (("vote_a", "A"), ("vote_b", "B"), ("vote_tie", "tie")):
        ui[key].click(_vote_handler(engine, which), inputs, outputs)


def tally_line(tally: dict[str, Any]) -> str:
    rate = tally.get("adapter_win_rate")
    rate_s = f"{rate:.0%}" if rate is not None else "–"
    return (
        f"Tally: fine-tuned won {tally['tuned_wins']}, base won {tally['base_wins']},"
        f" ties {tally['ties']} (of {tally['total']}) · adapter win rate {rate_s}"
        " (a tie counts half)"
    )


def _vote_handler(engine: chat.ChatEngine, which: str):
    """A click handler for one vote button; returns (reveal, voted, panel A, panel B).

    The vote goes to the run this tab loaded (its gr.State), the one that gave the answers,
    even when another tab has loaded something else since.
    """

    def handler(h, a, was_voted, blind_on, mine):
        unchanged = (gr.update(), was_voted, gr.update(), gr.update())
        if not blind_on:
            return unchanged
        if was_voted:
            gr.Info("Already voted on this round: send a new message for the next one.")
            return unchanged
        if not mine or not mine["has_adapter"] or not h["tuned"]:
            gr.Warning("Send a message first, then vote on the two answers.")
            return unchanged
        users = [m["content"] for m in h["base"] if m["role"] == "user"]
        answers = {
            side: next((m["content"] for m in reversed(h[side]) if m["role"] == "assistant"), "")
            for side in SIDES
        }
        try:
            tally = chat.record_blind_vote(
                mine["out_dir"],
                which,
                a,
                prompt=users[-1] if users else "",
                answers=answers,
                label=mine["label"],
            )
        except (chat.ChatError, OSError) as exc:
            gr.Warning(str(exc))
            return unchanged
        names = {p: chat.SIDE_LABELS[a[p]] for p in ("A", "B")}
        text = (
            f"A was **{names['A']}**, B was **{names['B']}**. {tally_line(tally)}."
            f" Saved to `{Path(mine['out_dir']) / chat.VOTES_FILE}`."
            " Send a new message for the next round."
        )
        labels = (gr.update(label=f"A · {names['A']}"), gr.update(label=f"B · {names['B']}"))
        return text, True, *labels

    return handler
