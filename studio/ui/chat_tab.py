"""Chat tab: the base model (A) and its fine-tune (B) side by side, from one loaded model.

A thin layer over `studio.chat`: pick a run (or checkpoint, or adapter folder), Load once,
and every message goes to both sides, streaming into two panels with their own histories.
Blind mode hides which panel is which until the user votes; batch compare scores a whole
prompt set on both sides and saves the table as CSV in the run folder.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from studio.chat import engine as chat
from studio.models.loader import DEFAULT_MODEL

LABEL_A = "A · base"
LABEL_B = "B · fine-tuned"
BLIND_A = "A (hidden)"
BLIND_B = "B (hidden)"
FINAL_ADAPTER = "final adapter"
SRC_VAL = "Validation split of the run"
SRC_FILE = "Prompt file"
TABLE_HEADERS = [
    "prompt",
    "reference",
    "base",
    "fine-tuned",
    "EM base",
    "EM tuned",
    "ROUGE-L base",
    "ROUGE-L tuned",
    "JSON ok base",
    "JSON ok tuned",
]
_STATE_FIELDS = ("base", "tuned")


def _run_choices() -> list[tuple[str, str]]:
    try:
        return [(r.label, str(r.path)) for r in chat.list_chat_runs()]
    except Exception:
        return []


def _checkpoint_choices(run_path: str | None) -> list[tuple[str, str]]:
    choices = [(FINAL_ADAPTER, "")]
    if run_path:
        for ckpt in chat.list_checkpoints(run_path):
            choices.append((ckpt.relative_to(run_path).as_posix(), str(ckpt)))
    return choices


def _settings(temperature, top_p, max_new_tokens, repetition_penalty, seed):
    return chat.GenerationSettings(
        temperature=float(temperature or 0),
        top_p=float(top_p or 1),
        max_new_tokens=int(max_new_tokens or 1),
        repetition_penalty=float(repetition_penalty or 1),
        seed=int(seed or 0),
    ).validate()


def _panels(hist: dict[str, list], assign: dict[str, str]) -> tuple[list, list]:
    return list(hist[assign["A"]]), list(hist[assign["B"]])


def _stats_line(engine: chat.ChatEngine, assign: dict[str, str]) -> str:
    parts = []
    for panel in ("A", "B"):
        st = engine.last_stats.get(assign[panel])
        if st is None:
            continue
        ttft = f"{st.ttft_s:.2f} s" if st.ttft_s is not None else "–"
        note = " · stopped" if st.stopped else (" · hit max new tokens" if st.hit_limit else "")
        parts.append(
            f"**{panel}**: {st.new_tokens} tokens, first token {ttft},"
            f" {st.tokens_per_s:.1f} tokens/s{note}"
        )
    return " &nbsp;|&nbsp; ".join(parts)


def _tally_line(tally: dict[str, Any]) -> str:
    rate = tally.get("adapter_win_rate")
    rate_s = f"{rate:.0%}" if rate is not None else "–"
    return (
        f"Tally: fine-tuned won {tally['tuned_wins']}, base won {tally['base_wins']},"
        f" ties {tally['ties']} (of {tally['total']}) · adapter win rate {rate_s}"
        " (a tie counts half)"
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
        *(show(row.get(k)) for k in ("base_rouge_l", "tuned_rouge_l")),
        *(show(row.get(k)) for k in ("base_json_ok", "tuned_json_ok")),
    ]


def _summary_md(summary: dict[str, Any], csv_path: Path | None, stopped: bool) -> str:
    def pct(v: Any) -> str:
        return f"{v:.0%}" if isinstance(v, float) else "–"

    def num(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "–"

    lines = [
        f"{'Stopped after' if stopped else 'Done:'} {summary['rows']} prompts"
        f" ({summary['with_reference']} with a reference,"
        f" {summary['json_references']} with a JSON reference).",
        "",
        "| | base | fine-tuned |",
        "|---|---|---|",
        f"| exact match | {pct(summary['base_exact_match'])}"
        f" | {pct(summary['tuned_exact_match'])} |",
        f"| ROUGE-L | {num(summary['base_rouge_l'])} | {num(summary['tuned_rouge_l'])} |",
        f"| JSON format (parses + keys) | {pct(summary['base_json_format'])}"
        f" | {pct(summary['tuned_json_format'])} |",
    ]
    if csv_path:
        lines += ["", f"Saved to `{csv_path}`"]
    return "\n".join(lines)


def build_chat_tab(ctx: dict[str, Any]) -> None:
    """Create the tab's components inside the open gr.Tab; register shared ones in ctx."""
    from gradio.context import get_render_context

    engine = chat.ChatEngine()
    ctx["chat.engine"] = engine
    tab = get_render_context()

    gr.Markdown(
        "Compare the base model (**A**) with your fine-tune (**B**): one model is loaded, and"
        " the base side is the same weights with the adapter switched off."
    )
    with gr.Row():
        run_dd = gr.Dropdown(label="Run", choices=_run_choices(), value=None, scale=3)
        ckpt_dd = gr.Dropdown(
            label="Checkpoint", choices=_checkpoint_choices(None), value="", scale=2
        )
        refresh_btn = gr.Button("Refresh runs", scale=0, min_width=120)
    with gr.Row():
        adapter_box = gr.Textbox(
            label="…or an adapter folder path",
            placeholder="/path/to/adapter (overrides the run picker)",
            scale=3,
        )
        base_dd = gr.Dropdown(
            label="Base model (the run's own unless you change it)",
            choices=[DEFAULT_MODEL],
            value="",
            allow_custom_value=True,
            scale=3,
        )
        precision = gr.Radio(
            list(chat.PRECISIONS),
            value=chat.PRECISION_AUTO,
            label="Base precision",
            info="As trained: 4-bit for QLoRA runs, 16-bit for LoRA runs",
            scale=2,
        )
    with gr.Row():
        load_btn = gr.Button("Load", variant="primary")
        unload_btn = gr.Button("Unload")
    status = gr.Markdown("Nothing loaded yet: pick a run and press Load.", elem_id="chat-status")

    system = gr.Textbox(
        label="System prompt (blank: the template's default)",
        lines=2,
        placeholder="e.g. the system prompt your dataset used",
    )
    with gr.Accordion("Generation settings (shared by A and B)", open=False), gr.Row():
        temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
        max_new = gr.Slider(
            1, 2048, value=256, step=1, label="Max new tokens", elem_id="chat-max-new"
        )
        rep_pen = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")
        seed = gr.Number(value=42, precision=0, label="Seed")
    gen_inputs = [temperature, top_p, max_new, rep_pen, seed]

    blind = gr.Checkbox(
        label="Blind mode: hide which side is which until you vote",
        value=False,
    )
    with gr.Row():
        chat_a = gr.Chatbot(label=LABEL_A, height=420, elem_id="chat-a")
        chat_b = gr.Chatbot(label=LABEL_B, height=420, elem_id="chat-b")
    msg = gr.Textbox(
        label="Message (sent to both sides)",
        lines=2,
        placeholder="Type a message, then press Send",
        elem_id="chat-msg",
    )
    with gr.Row():
        send_btn = gr.Button("Send", variant="primary")
        stop_btn = gr.Button("Stop", variant="stop")
        clear_btn = gr.Button("Clear")
    stats = gr.Markdown("", elem_id="chat-stats")
    with gr.Row(visible=False) as vote_row:
        vote_a = gr.Button("A is better")
        vote_tie = gr.Button("Tie")
        vote_b = gr.Button("B is better")
    reveal = gr.Markdown("", elem_id="chat-reveal")

    with gr.Accordion("Batch compare", open=False):
        gr.Markdown(
            "Run a set of prompts through both sides and score them against references:"
            " exact match, ROUGE-L, and, where the reference is JSON, whether the answer parses"
            " and carries the same keys. The table is saved as CSV in the run folder."
        )
        with gr.Row():
            batch_src = gr.Radio([SRC_VAL, SRC_FILE], value=SRC_VAL, label="Prompts from")
            batch_file = gr.File(
                label="Prompt file (.jsonl / .json / .csv / .txt)",
                file_types=[".jsonl", ".json", ".csv", ".txt"],
                type="filepath",
                elem_id="chat-batch-file",
            )
            batch_limit = gr.Number(value=20, precision=0, label="At most this many prompts")
        batch_btn = gr.Button("Run batch compare")
        batch_status = gr.Markdown("", elem_id="chat-batch-status")
        batch_table = gr.Dataframe(
            headers=TABLE_HEADERS,
            wrap=True,
            interactive=False,
            max_chars=200,  # a click shows the whole cell; the CSV has everything
            column_widths=["18%", "16%", "16%", "16%", *["5.6%"] * 6],
            elem_id="chat-batch-table",
        )
        batch_csv = gr.File(label="CSV", interactive=False)

    # Each side's history and the blind assignment live in state (the panels only show them).
    hist = gr.State({"base": [], "tuned": []})
    assign = gr.State({"A": "base", "B": "tuned"})
    voted = gr.State(False)

    # ---- runs and loading

    def refresh_runs(current: str | None):
        choices = _run_choices()
        values = {v for _, v in choices}
        value = current if current in values else (choices[0][1] if choices else None)
        return gr.update(choices=choices, value=value)

    def on_run(run_path: str | None):
        base = ""
        for r in chat.list_chat_runs() if run_path else []:
            if str(r.path) == run_path:
                base = r.base_model
        return gr.update(choices=_checkpoint_choices(run_path), value=""), gr.update(value=base)

    refresh_btn.click(refresh_runs, run_dd, run_dd)
    run_dd.change(on_run, run_dd, [ckpt_dd, base_dd])
    if isinstance(tab, gr.Tab):
        tab.select(refresh_runs, run_dd, run_dd)
    ctx["chat.refresh"] = (refresh_runs, run_dd)

    def fresh(blind_on: bool):
        a = chat.new_blind_assignment() if blind_on else {"A": "base", "B": "tuned"}
        labels = (BLIND_A, BLIND_B) if blind_on else (LABEL_A, LABEL_B)
        return (
            {"base": [], "tuned": []},
            a,
            False,
            gr.update(value=[], label=labels[0]),
            gr.update(value=[], label=labels[1]),
            "",
            "",
        )

    reset_outputs = [hist, assign, voted, chat_a, chat_b, stats, reveal]

    def do_load(run_path, ckpt, adapter_path, base, prec, blind_on, progress=gr.Progress()):  # noqa: B008
        target = (adapter_path or "").strip() or ckpt or run_path
        if not target:
            return (
                "Pick a run (or paste an adapter folder path), then press Load.",
                *fresh(blind_on),
            )
        try:
            info = engine.load(target, base or None, prec, progress=lambda m, f: progress(f, m))
        except chat.ChatError as exc:
            return (f"**Error:** {exc}", *fresh(blind_on))
        except Exception as exc:  # the app must survive any loading failure
            return (f"**Error:** loading failed: {type(exc).__name__}: {exc}", *fresh(blind_on))
        text = info.summary()
        for w in info.warnings:
            text += f"\n\n**Warning:** {w}"
        return (text, *fresh(blind_on))

    load_btn.click(
        do_load,
        [run_dd, ckpt_dd, adapter_box, base_dd, precision, blind],
        [status, *reset_outputs],
        concurrency_limit=1,
        concurrency_id="chat-load",
    )

    def do_unload(blind_on):
        engine.unload()
        return ("Unloaded: memory freed.", *fresh(blind_on))

    unload_btn.click(do_unload, blind, [status, *reset_outputs])

    # ---- chatting

    def send(text, h, a, was_voted, blind_on, sys_prompt, *gen):
        text = (text or "").strip()
        if not text:
            yield gr.update(), h, a, was_voted, *_panels(h, a), gr.update(), gr.update()
            return
        blocker = chat.training_blocker()
        if not engine.loaded:
            blocker = blocker or "Nothing loaded yet: pick a run and press Load."
        problem = blocker
        try:
            settings = _settings(*gen)
        except chat.ChatError as exc:
            problem = problem or f"Generation settings: {exc}"
        if problem:
            gr.Warning(problem)
            yield gr.update(), h, a, was_voted, *_panels(h, a), f"**Error:** {problem}", gr.update()
            return
        reveal_text = gr.update()
        new_round = False
        if blind_on and was_voted:  # a vote ends a blind round: start a fresh one
            h = {"base": [], "tuned": []}
            a = chat.new_blind_assignment()
            was_voted, new_round, reveal_text = False, True, ""
        h = {side: [*h[side], {"role": "user", "content": text}] for side in _STATE_FIELDS}
        partial = {side: "" for side in _STATE_FIELDS}

        def view():
            shown = {
                side: h[side] + ([{"role": "assistant", "content": partial[side]}])
                for side in _STATE_FIELDS
            }
            return shown[a["A"]], shown[a["B"]]

        first_a, first_b = view()
        if new_round:  # hide the sides again
            first_a = gr.update(value=first_a, label=BLIND_A)
            first_b = gr.update(value=first_b, label=BLIND_B)
        yield "", h, a, was_voted, first_a, first_b, "Generating…", reveal_text
        order = (a["A"], a["B"])
        error = None
        try:
            for side, chunk in engine.compare_stream(h, settings, system=sys_prompt, order=order):
                partial[side] += chunk
                yield "", h, a, was_voted, *view(), gr.update(), gr.update()
        except chat.ChatError as exc:
            error = str(exc)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        for side in _STATE_FIELDS:
            answer = partial[side] or ("(stopped)" if engine.stopped else "")
            h[side] = [*h[side], {"role": "assistant", "content": answer}]
        line = _stats_line(engine, a)
        if error:
            line = f"**Error:** {error}"
        yield "", h, a, was_voted, *_panels(h, a), line, gr.update()

    send_inputs = [msg, hist, assign, voted, blind, system, *gen_inputs]
    send_outputs = [msg, hist, assign, voted, chat_a, chat_b, stats, reveal]
    send_btn.click(send, send_inputs, send_outputs, concurrency_limit=1, concurrency_id="chat-gen")
    msg.submit(send, send_inputs, send_outputs, concurrency_limit=1, concurrency_id="chat-gen")
    stop_btn.click(engine.stop, None, None, queue=False)
    clear_btn.click(fresh, blind, reset_outputs)

    def on_blind(blind_on):
        return (*fresh(blind_on), gr.update(visible=bool(blind_on)))

    blind.change(on_blind, blind, [*reset_outputs, vote_row])

    # ---- blind votes

    def vote(which: str):
        def handler(h, a, was_voted, blind_on):
            if not blind_on:
                return gr.update(), was_voted, gr.update(), gr.update()
            if was_voted:
                gr.Info("Already voted on this round: send a new message for the next one.")
                return gr.update(), was_voted, gr.update(), gr.update()
            if engine.source is None or not h["tuned"]:
                gr.Warning("Send a message first, then vote on the two answers.")
                return gr.update(), was_voted, gr.update(), gr.update()
            users = [m["content"] for m in h["base"] if m["role"] == "user"]
            answers = {
                side: next(
                    (m["content"] for m in reversed(h[side]) if m["role"] == "assistant"), ""
                )
                for side in _STATE_FIELDS
            }
            try:
                tally = chat.record_blind_vote(
                    engine.source.out_dir,
                    which,
                    a,
                    prompt=users[-1] if users else "",
                    answers=answers,
                    label=engine.source.label,
                )
            except (chat.ChatError, OSError) as exc:
                gr.Warning(str(exc))
                return gr.update(), was_voted, gr.update(), gr.update()
            names = {p: chat.SIDE_LABELS[a[p]] for p in ("A", "B")}
            text = (
                f"A was **{names['A']}**, B was **{names['B']}**. {_tally_line(tally)}."
                f" Saved to `{Path(engine.source.out_dir) / chat.VOTES_FILE}`."
                " Send a new message for the next round."
            )
            return (
                text,
                True,
                gr.update(label=f"A · {names['A']}"),
                gr.update(label=f"B · {names['B']}"),
            )

        return handler

    for btn, which in ((vote_a, "A"), (vote_b, "B"), (vote_tie, "tie")):
        btn.click(vote(which), [hist, assign, voted, blind], [reveal, voted, chat_a, chat_b])

    # ---- batch compare

    def run_batch(src, file_path, limit, sys_prompt, *gen):
        empty = gr.update()
        if not engine.loaded:
            yield "**Error:** nothing loaded yet: pick a run and press Load.", empty, empty
            return
        try:
            settings = _settings(*gen)
            n = int(limit) if limit and int(limit) > 0 else None
            if src == SRC_FILE:
                if not file_path:
                    raise chat.ChatError("Choose a prompt file first.")
                items = chat.load_prompt_file(file_path, n)
            else:
                if engine.source is None or engine.source.run_dir is None:
                    raise chat.ChatError(
                        "This adapter is not inside a run folder, so it has no validation split;"
                        " use a prompt file."
                    )
                items = chat.validation_items(engine.source.run_dir, n)
        except chat.ChatError as exc:
            yield f"**Error:** {exc}", empty, empty
            return
        events: queue.Queue = queue.Queue()
        result: dict[str, Any] = {}

        def work():
            try:
                result["r"] = chat.batch_compare(
                    engine,
                    items,
                    settings,
                    system=sys_prompt,
                    progress=lambda d, t, m: events.put(("progress", (d, t, m))),
                    on_row=lambda row: events.put(("row", row)),
                )
            except Exception as exc:
                result["error"] = exc
            events.put(("done", None))

        threading.Thread(target=work, name="chat-batch", daemon=True).start()
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
                yield f"{message} · {done}/{total} done", gr.update(), gr.update()
        if "error" in result:
            yield f"**Error:** batch compare failed: {result['error']}", frame(), None
            return
        res = result["r"]
        csv_file = str(res.csv_path) if res.csv_path else None
        yield _summary_md(res.summary, res.csv_path, res.stopped), frame(), csv_file

    batch_btn.click(
        run_batch,
        [batch_src, batch_file, batch_limit, system, *gen_inputs],
        [batch_status, batch_table, batch_csv],
        concurrency_limit=1,
        concurrency_id="chat-gen",
    )

    ctx["chat.run"] = run_dd
    ctx["chat.status"] = status


def wire_chat_tab(ctx: dict[str, Any]) -> None:
    """Refresh the run list when the app loads and when the Train tab says a run ended."""
    refresh, run_dd = ctx["chat.refresh"]
    demo = ctx.get("demo")
    if demo is not None:
        demo.load(refresh, run_dd, run_dd)
    signal = ctx.get("runs.refresh")
    if signal is not None and hasattr(signal, "change"):
        signal.change(refresh, run_dd, run_dd)
