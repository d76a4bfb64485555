"""Chat tab, blind mode: vote on two hidden answers, then see which side was which.

Votes are saved with the run (`studio.chat.evaluate.record_blind_vote`), and the tally gives
the adapter's win rate. "Make a preference dataset from my votes" turns them into
prompt/chosen/rejected pairs (`studio.chat.evaluate.votes_to_pairs`) and points the Dataset
and Train tabs at them: objective DPO, continuing from the voted run's adapter, so Start in
the Train tab is the second click.
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
    with gr.Row():
        ui["make_pairs"] = gr.Button(
            "Make a preference dataset from my votes", size="sm", elem_id="chat-make-pairs"
        )
    ui["pairs_md"] = gr.Markdown("", elem_id="chat-pairs")


# The other tabs' components the pairs button fills (those present in ctx).
PAIR_TARGETS = (
    "dataset.path",
    "dataset.format",
    "dataset.pii_count",
    "train.objective",
    "train.init_adapter",
)


def wire_pairs(ui: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The pairs button: writes the dataset, then fills the other tabs that exist."""
    targets = [key for key in PAIR_TARGETS if key in ctx]
    ui["make_pairs"].click(
        lambda mine: make_pairs(mine, targets),
        ui["loaded"],
        [ui["pairs_md"], *(ctx[key] for key in targets)],
    )


def make_pairs(mine: dict[str, Any] | None, targets: list[str]) -> list[Any]:
    """(message, then a value per target) after writing the votes of the loaded run as a new
    preference dataset; on failure only the message changes."""
    from studio.data.scan import PIICheckError, file_pii_count

    skip = [gr.skip() for _ in targets]
    if not mine or not mine.get("has_adapter"):
        return ["Load a run and vote in blind mode first.", *skip]
    try:
        made = chat.votes_to_pairs(mine["out_dir"], mine.get("label", ""))
        pii = file_pii_count(made.path)
    except (chat.ChatError, PIICheckError, OSError) as exc:
        return [f"⚠️ {exc}", *skip]
    run_dir = Path(mine["out_dir"])
    start = str(run_dir) if (run_dir / "adapter").is_dir() else ""
    values = {
        "dataset.path": str(made.path),
        "dataset.format": "preference",
        "dataset.pii_count": pii,
        "train.objective": "dpo",
        "train.init_adapter": start,
    }
    text = (
        f"Wrote **{made.pairs}** preference pairs to `{made.path}` (winner chosen, loser"
        f" rejected; {made.ties} ties and {made.skipped} unusable votes left out). The Train"
        " tab is set to **DPO** on them"
        + (f", continuing from `{run_dir.name}`'s adapter" if start else "")
        + ": press **Start training** there."
    )
    if pii:
        text += f" ⚠️ {pii} possible personal-data finding(s): check them in the Dataset tab."
    return [text, *(values[key] for key in targets)]


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
