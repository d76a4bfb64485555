"""Export section of the Chat tab: merged model, GGUF and an Ollama Modelfile from a run.

A thin layer over `studio.export.export_run` (the same engine as `python -m studio.export`):
the export runs in a worker thread while the Export button's handler streams its progress,
then shows the sanity check, the files written, the Modelfile and the ollama commands.
"""

from __future__ import annotations

import html
import threading
import time
from typing import Any

import gradio as gr

from studio import runs
from studio.export import run as export
from studio.export.merge import case_verdict

GGUF_CHOICES = [
    ("GGUF f16 (exact, about the size of the merged model)", "f16"),
    ("GGUF q8_0 (about half the size, tiny rounding)", "q8_0"),
    ("GGUF q4_K_M (what most Ollama / llama.cpp users run; about 30% of f16)", "q4_K_M"),
    ("GGUF q5_K_M (a little larger, a little closer to f16)", "q5_K_M"),
    ("GGUF q6_K (close to q8_0 quality, smaller)", "q6_K"),
    ("No GGUF (Ollama imports the merged safetensors folder)", "none"),
]
CHECK_HEADERS = ["Check", "Prompt", "Reference answer", "Exported answer", "Same?"]
FILE_HEADERS = ["File", "Size (MB)"]
INTRO = (
    "Turn a run into files other tools use: the **merged model** (base + adapter folded into"
    " one safetensors folder, always written), optionally a **GGUF** file for llama.cpp / LM"
    " Studio, and an **Ollama Modelfile** with the exact `ollama create` / `ollama run`"
    " commands. Same as `python -m studio.export RUN_DIR`. Nothing is overwritten: a second"
    " export of a run goes to `export-<time>/`."
)
QLORA_MD = "**Why QLoRA runs are merged into a 16-bit base.** " + export.QLORA_NOTE
KQUANT_MD = (
    "**Which tool makes which GGUF file.** f16 and q8_0 are written by llama.cpp's own"
    " converter and loaded back here to compare answers with the merged model. The k-quants"
    " (q4_K_M, q5_K_M, q6_K) are made from that checked f16 file: by llama.cpp's own quantizer"
    " (`llama_model_quantize`, from the PyPI wheel `llama-cpp-py-sync`) when it is installed"
    " and loads on this PC (its Linux build needs glibc 2.38+, e.g. Ubuntu 24.04); otherwise"
    " the export keeps the f16 file and the command becomes `ollama create NAME --quantize"
    " q4_K_M -f Modelfile`, so Ollama's quantizer (llama.cpp's code inside Ollama) makes it."
    " A k-quant is lossy by design and is not compared with the merged model here."
)


def _run_choices() -> list[tuple[str, str]]:
    try:
        return [(_run_label(r), str(r.path)) for r in runs.list_runs(with_adapter=True)]
    except Exception:  # a broken runs folder must not break the page
        return []


def _run_label(run: runs.Run) -> str:
    done = export.past_exports(run)
    return f"{run.name} · {run.method} · {run.status}" + (
        f" · exported ×{len(done)}" if done else ""
    )


def _run_details(run_path: str | None) -> str:
    if not run_path:
        return "No finished run with an adapter yet: train one in the Train tab."
    try:
        src = export.inspect_run(run_path)
    except export.ExportError as exc:
        return f"⚠️ {exc}"
    earlier = export.past_exports(src)
    text = f"Base **{src.base_model}** · method **{src.method}** · folder `{src.path}`"
    if earlier:
        text += f"\n\nEarlier exports (kept): {', '.join(f'`{e}`' for e in earlier)}"
    if src.method == "qlora":
        text += (
            "\n\nQLoRA run: the adapter is merged into the **16-bit** base, not the 4-bit one"
            " it was trained on (why: see below)."
        )
    return text


def _bar(frac: float, msg: str, elapsed: float) -> str:
    width = 30
    done = int(max(0.0, min(1.0, frac)) * width)
    bar = "█" * done + "░" * (width - done)
    return f"`{bar}` **{frac:.0%}** · {elapsed:.0f} s · {html.escape(msg)}"


def _check_rows(result: export.ExportResult) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for chk in (result.merge_check, result.gguf_check):
        if chk is None:
            continue
        for c in chk.cases:
            mark = "✅ " if c.match else ("🟡 " if c.near_tie else "❌ ")
            rows.append([chk.title, c.prompt, c.expected, c.got, mark + case_verdict(c)])
    return rows


def _summary(result: export.ExportResult) -> str:
    lines = [f"✅ **Exported** to `{result.export_dir}` in {result.seconds:.0f} s."]
    for chk in (result.merge_check, result.gguf_check):
        if chk is not None:
            lines.append(("✅ " if chk.passed else "⚠️ ") + chk.summary + ".")
            if chk.note:
                lines.append(chk.note)
    if result.gguf_check is None and result.gguf_path:
        lines.append("The GGUF file was not loaded back (verification was switched off).")
    lines.append(f"Merge: {result.merge_precision}")
    tmpl = "derived and checked" if result.template_exact else "**approximated** (see Modelfile)"
    lines.append(f"Ollama template: {result.template_family} style, {tmpl}.")
    if result.gguf_route:
        lines.append(f"GGUF route: {result.gguf_route}")
    lines += [f"ℹ️ {n}" for n in result.notes]
    lines += [f"⚠️ {w}" for w in result.warnings]
    return "\n\n".join(lines)


def build_export_section(ctx: dict[str, Any]) -> dict[str, Any]:
    """Create the section's components inside the open Accordion; returns them by name."""
    ui: dict[str, Any] = {}
    gr.Markdown(INTRO)
    with gr.Row():
        ui["run_dd"] = gr.Dropdown(
            choices=_run_choices(),
            label="Run to export",
            scale=4,
            elem_id="export-run",
        )
        ui["refresh"] = gr.Button("Refresh runs", scale=1, elem_id="export-refresh")
    ui["details"] = gr.Markdown("", elem_id="export-run-details")
    with gr.Row():
        ui["gguf"] = gr.Radio(
            choices=GGUF_CHOICES, value="f16", label="GGUF file", scale=3, elem_id="export-gguf"
        )
        ui["verify"] = gr.Checkbox(
            value=True,
            label="Load the GGUF back and compare answers (slower, recommended)",
            scale=2,
        )
    with gr.Accordion("Why QLoRA runs are merged into a 16-bit base", open=False):
        gr.Markdown(QLORA_MD)
    with gr.Accordion("q4_K_M and other k-quants: which tool makes them", open=False):
        gr.Markdown(KQUANT_MD)
    ui["export"] = gr.Button("Export", variant="primary", elem_id="export-button")
    ui["status"] = gr.Markdown("", elem_id="export-status")
    _build_results(ui)
    return ui


def _build_results(ui: dict[str, Any]) -> None:
    """The sanity check, files written, ollama commands and Modelfile (shown after export)."""
    with gr.Group(visible=False) as ui["results"]:
        ui["checks"] = gr.Dataframe(
            headers=CHECK_HEADERS,
            label="Sanity check: greedy answers, same prompts",
            wrap=True,
            column_widths=["16%", "26%", "24%", "24%", "10%"],
            interactive=False,
            elem_id="export-checks",
        )
        ui["files"] = gr.Dataframe(
            headers=FILE_HEADERS,
            label="Files written",
            interactive=False,
            column_widths=["80%", "20%"],
            elem_id="export-files",
        )
        ui["commands"] = gr.Code(
            label="Ollama commands (Ollama need not be installed to export)",
            language="shell",
            interactive=False,
            elem_id="export-commands",
        )
        ui["modelfile"] = gr.Code(
            label="Modelfile", language="dockerfile", interactive=False, elem_id="export-modelfile"
        )


def refresh(current: str | None) -> tuple[Any, str]:
    """The run picker's choices (keeping the current pick when it still exists), its details."""
    choices = _run_choices()
    values = {v for _, v in choices}
    value = current if current in values else (choices[0][1] if choices else None)
    return gr.update(choices=choices, value=value), _run_details(value)


def do_export(run_path: str | None, gguf_type: str, verify_gguf: bool):
    """Run the export on a worker thread and stream its progress, then its results.

    Yields (status, results group, check rows, file rows, commands, Modelfile).
    """
    empty = (gr.update(visible=False), [], [], "", "")
    if not run_path:
        yield ("Pick a run first (train one in the Train tab if the list is empty).", *empty)
        return
    state: dict[str, Any] = {"msg": "Starting", "frac": 0.0, "result": None, "error": None}

    def progress(msg: str, frac: float) -> None:
        state["msg"], state["frac"] = msg, frac

    def work() -> None:
        try:
            state["result"] = export.export_run(
                run_path, gguf=gguf_type, progress=progress, verify_gguf=verify_gguf
            )
        except export.ExportError as exc:
            state["error"] = str(exc)
        except Exception as exc:  # the app must survive any export failure
            state["error"] = f"Export failed: {type(exc).__name__}: {exc}"

    t0 = time.time()
    worker = threading.Thread(target=work, name="export", daemon=True)
    worker.start()
    while worker.is_alive():
        yield (_bar(state["frac"], state["msg"], time.time() - t0), *empty)
        worker.join(timeout=0.5)
    if state["error"]:
        text = html.escape(state["error"]).replace("\n", "<br>")
        yield (f"❌ {text}", *empty)
        return
    result: export.ExportResult = state["result"]
    file_rows = [[p, round(n / 1e6, 1)] for p, n in result.files]
    cmds = f"{result.create_command}\n{result.run_command}\n"
    shown = gr.update(visible=True)
    yield (_summary(result), shown, _check_rows(result), file_rows, cmds, result.modelfile)


def wire_export_section(ctx: dict[str, Any], ui: dict[str, Any]) -> None:
    """Own events, and a refreshed run list when the page loads and when the Train tab says a
    run ended."""
    run_dd, details = ui["run_dd"], ui["details"]
    ui["refresh"].click(refresh, run_dd, [run_dd, details])
    run_dd.change(_run_details, run_dd, details)
    ui["export"].click(
        do_export,
        [run_dd, ui["gguf"], ui["verify"]],
        [ui[k] for k in ("status", "results", "checks", "files", "commands", "modelfile")],
        concurrency_limit=1,
        concurrency_id="export",
    )
    demo = ctx.get("demo")
    if demo is not None:
        demo.load(refresh, run_dd, [run_dd, details])
    signal = ctx.get("runs.refresh")
    if signal is not None and hasattr(signal, "change"):
        signal.change(refresh, run_dd, [run_dd, details])
