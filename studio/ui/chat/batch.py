"""Chat tab, batch compare: a prompt set through both sides, scored against references.

Scores are exact match, BLEU, chrF, ROUGE-L and, where the reference is JSON, whether the
answer parses and carries the same keys (`studio.chat.evaluate.batch_compare`); the table is
saved as CSV in the run folder. Rows stream into the table as they finish.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from studio import chat
from studio.ui.chat.conversation import gen_inputs, generation_settings, model_changed

SRC_VAL = "Validation split of the run"
SRC_FILE = "Prompt file"
TABLE_HEADERS = [
    "prompt",
    "reference",
    "base",
    "fine-tuned",
    "EM base",
    "EM tuned",
    "BLEU base",
    "BLEU tuned",
    "chrF base",
    "chrF tuned",
    "ROUGE-L base",
    "ROUGE-L tuned",
    "JSON ok base",
    "JSON ok tuned",
]


def build_batch(ui: dict[str, Any]) -> None:
    """The Batch compare accordion."""
    with gr.Accordion("Batch compare", open=False):
        gr.Markdown(
            "Run a set of prompts through both sides and score them against references:"
            " exact match, BLEU and chrF (sacrebleu), ROUGE-L (rouge-score), and, where the"
            " reference is JSON, whether the answer parses"
            " and carries the same keys. The table is saved as CSV in the run folder."
        )
        with gr.Row():
            ui["batch_src"] = gr.Radio([SRC_VAL, SRC_FILE], value=SRC_VAL, label="Prompts from")
            ui["batch_file"] = gr.File(
                label="Prompt file (.jsonl / .json / .csv / .txt)",
                file_types=[".jsonl", ".json", ".csv", ".txt"],
                type="filepath",
                elem_id="chat-batch-file",
            )
            ui["batch_limit"] = gr.Number(value=20, precision=0, label="At most this many prompts")
        ui["batch_btn"] = gr.Button("Run batch compare")
        ui["batch_status"] = gr.Markdown("", elem_id="chat-batch-status")
        ui["batch_table"] = gr.Dataframe(
            headers=TABLE_HEADERS,
            wrap=True,
            interactive=False,
            max_chars=200,  # a click shows the whole cell; the CSV has everything
            column_widths=["16%", "14%", "14%", "14%", *["4.2%"] * 10],
            elem_id="chat-batch-table",
        )
        ui["batch_csv"] = gr.File(label="CSV", interactive=False)


def wire_batch(ui: dict[str, Any], engine: chat.ChatEngine) -> None:
    ui["batch_btn"].click(
        partial(run_batch, engine),
        [ui[k] for k in ("batch_src", "batch_file", "batch_limit", "system", "loaded")]
        + gen_inputs(ui),
        [ui["batch_status"], ui["batch_table"], ui["batch_csv"]],
        concurrency_limit=1,
        concurrency_id="chat-gen",
    )


def _table_row(row: dict[str, Any]) -> list[Any]:
    def show(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "yes" if v else "no"
        return v

    return [
        row["prompt"],
        row["reference"],
        row["base"],
        row["fine_tuned"],
        *(show(row.get(k)) for k in ("base_exact_match", "tuned_exact_match")),
        *(show(row.get(k)) for k in ("base_bleu", "tuned_bleu", "base_chrf", "tuned_chrf")),
        *(show(row.get(k)) for k in ("base_rouge_l", "tuned_rouge_l")),
        *(show(row.get(k)) for k in ("base_json_ok", "tuned_json_ok")),
    ]


def _summary_md(
    summary: dict[str, Any], csv_path: Path | None, stopped: bool, error: str | None = None
) -> str:
    def pct(v: Any) -> str:
        return f"{v:.0%}" if isinstance(v, float) else "–"

    def num(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "–"

    def one(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else "–"

    lines = [
        f"{'Stopped after' if stopped else 'Done:'} {summary['rows']} prompts"
        f" ({summary['with_reference']} with a reference,"
        f" {summary['json_references']} with a JSON reference).",
        "",
        "| | base | fine-tuned |",
        "|---|---|---|",
        f"| exact match | {pct(summary['base_exact_match'])}"
        f" | {pct(summary['tuned_exact_match'])} |",
        f"| BLEU (0-100) | {one(summary.get('base_bleu'))} | {one(summary.get('tuned_bleu'))} |",
        f"| chrF (0-100; fairer for Thai and Vietnamese) | {one(summary.get('base_chrf'))}"
        f" | {one(summary.get('tuned_chrf'))} |",
        f"| ROUGE-L | {num(summary['base_rouge_l'])} | {num(summary['tuned_rouge_l'])} |",
        f"| JSON format (parses + keys) | {pct(summary['base_json_format'])}"
        f" | {pct(summary['tuned_json_format'])} |",
    ]
    if error:
        lines += ["", f"**Ended early:** {error}"]
    if csv_path:
        lines += ["", f"Saved to `{csv_path}`"]
    return "\n".join(lines)


def _batch_items(engine: chat.ChatEngine, src: str, file_path: str | None, n: int | None):
    """The prompts to run: a prompt file, or the loaded run's validation split."""
    if src == SRC_FILE:
        if not file_path:
            raise chat.ChatError("Choose a prompt file first.")
        return chat.load_prompt_file(file_path, n)
    if engine.source is None or engine.source.run_dir is None:
        raise chat.ChatError(
            "This adapter is not inside a run folder, so it has no validation split;"
            " use a prompt file."
        )
    return chat.validation_items(engine.source.run_dir, n)


def _start_worker(
    engine: chat.ChatEngine, items: list, settings: Any, system: str, expect_id: int
) -> tuple[queue.Queue, dict[str, Any]]:
    """Run the batch on a thread; it posts ("progress" | "row" | "done", payload) events."""
    events: queue.Queue = queue.Queue()
    result: dict[str, Any] = {}

    def work():
        try:
            result["r"] = chat.batch_compare(
                engine,
                items,
                settings,
                system=system,
                progress=lambda d, t, m: events.put(("progress", (d, t, m))),
                on_row=lambda row: events.put(("row", row)),
                expect_id=expect_id,
            )
        except Exception as exc:
            result["error"] = exc
        events.put(("done", None))

    threading.Thread(target=work, name="chat-batch", daemon=True).start()
    return events, result


def run_batch(
    engine: chat.ChatEngine, src, file_path, limit, sys_prompt, mine, *gen
) -> Iterator[tuple[Any, Any, Any]]:
    """Stream (status, table, CSV file) while the batch runs.

    Runs only on the model this tab loaded (`mine`); while it runs, a Load or Unload from
    any tab is refused, and the CSV goes to the run the batch started with.
    """
    empty = gr.update()
    notice = model_changed(engine, mine)
    if notice:
        advice = " Load your pick again here, then run the batch." if engine.loaded else ""
        yield f"**Error:** {notice}{advice}", empty, empty
        return
    if not mine["has_adapter"]:
        yield f"**Error:** {chat.NO_TUNED}", empty, empty
        return
    try:
        settings = generation_settings(*gen)
        n = int(limit) if limit and int(limit) > 0 else None
        items = _batch_items(engine, src, file_path, n)
    except chat.ChatError as exc:
        yield f"**Error:** {exc}", empty, empty
        return
    events, result = _start_worker(engine, items, settings, sys_prompt, mine["id"])
    table: list[list[Any]] = []

    def frame():
        import pandas as pd

        return pd.DataFrame(table, columns=TABLE_HEADERS)

    yield f"Starting: {len(items)} prompts, both sides…", frame(), None
    while True:
        kind, payload = events.get()
        if kind == "done":
            break
        if kind == "row":
            table.append(_table_row(payload))
            yield gr.update(), frame(), gr.update()
        else:
            done, total, message = payload
            mode = f" · {engine.last_mode}" if done and engine.last_mode else ""
            yield f"{message} · {done}/{total} done{mode}", gr.update(), gr.update()
    if "error" in result:
        yield f"**Error:** batch compare failed: {result['error']}", frame(), None
        return
    res = result["r"]
    csv_file = str(res.csv_path) if res.csv_path else None
    yield _summary_md(res.summary, res.csv_path, res.stopped, res.error), frame(), csv_file
