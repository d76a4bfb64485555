"""Dataset tab: pick a file, see whether it is usable, what training will see, and clean PII.

A thin layer over `studio.data` (load, validate, token lengths, preview) and `studio.pii`
(scan, redact, drop). Shares with other tabs, as gr.State: "dataset.path" (the file training
reads; "" means the bundled sample), "dataset.format" and "dataset.pii_count" (unresolved PII
findings in that file). Reads "model.name" (tokenizer) and "train.max_seq_len" when present.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr

from studio.data import load as data

log = logging.getLogger(__name__)

NONE_COLUMN = "(none)"
PAGE_SIZE = 20
MAX_TABLE_ROWS = 1000  # invalid-row and PII tables show this many; the counts show all
_TOKENIZERS: dict[str, Any] = {}
_TOKENIZER_LOCK = threading.Lock()


# --------------------------------------------------------------------------- helpers


def _tokenizer(model_name: str | None) -> tuple[Any, str]:
    """The base model's tokenizer (cached per model folder), or None and why not."""
    from studio.models import loader as models

    name = (model_name or "").strip() or models.DEFAULT_MODEL
    try:
        with _TOKENIZER_LOCK:
            if name not in _TOKENIZERS:
                resolved = models.resolve_model(name)
                key = str(resolved.path)
                if key not in _TOKENIZERS:
                    _TOKENIZERS[key] = models.load_tokenizer(resolved.path)
                _TOKENIZERS[name] = _TOKENIZERS[key]
            return _TOKENIZERS[name], name
    except Exception as exc:
        log.warning("tokenizer for %s unavailable: %s", name, exc)
        return None, " ".join(str(exc).split()) or f"{name}: {type(exc).__name__}"


def _number(value: Any, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _max_len(value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return data.DEFAULT_MAX_LEN
    return n if n > 0 else data.DEFAULT_MAX_LEN


def _resolve_user_path(text: str) -> Path:
    """The file a user typed, with a clear DatasetError when it cannot be used."""
    raw = (text or "").strip().strip("'\"")
    if not raw:
        raise data.DatasetError("Enter the path of a dataset file, or upload one.")
    path = Path(raw).expanduser()
    try:
        path = path.resolve()
    except OSError as exc:
        raise data.DatasetError(f"{raw}: not a usable path ({exc}).") from None
    if not path.exists():
        raise data.DatasetError(f"{path} does not exist. Check the path, or upload the file.")
    if path.is_dir():
        raise data.DatasetError(f"{path} is a folder. Enter the path of one dataset file.")
    if not os.access(path, os.R_OK):
        raise data.DatasetError(f"{path} cannot be read (permission denied).")
    return path


def _box(kind: str, text: str) -> str:
    # Plain symbols, not emoji: they render without an emoji font.
    icon = {"error": "✖ **Error:**", "warn": "⚠", "ok": "✔", "info": "ℹ"}[kind]
    return f"{icon} {text}"


def _summary_md(
    report: data.DatasetReport,
    name: str,
    val_fraction: float = data.DEFAULT_VAL_FRACTION,
    seed: int = data.DEFAULT_SEED,
) -> str:
    n_train, n_val = data.split_sizes(report.valid, val_fraction)
    kind = report.file_kind.upper()
    dup = "none"
    if report.duplicates:
        shown = "; ".join(" = ".join(map(str, g)) for g in report.duplicates[:8])
        more = "; …" if len(report.duplicates) > 8 else ""
        dup = f"{report.duplicate_rows} ({report.unit}s {shown}{more})"
    roles = " · ".join(f"{r} {n:,}" for r, n in report.roles.items()) or "none"
    t = report.turns
    lines = [
        f"### {name}",
        f"**Format:** {report.format} ({kind})",
        "",
        "| rows | valid | invalid | exact duplicates | train / validation split |",
        "|---:|---:|---:|---|---|",
        f"| {report.total:,} | {report.valid:,} | {report.invalid:,} | {dup} |"
        f" {n_train:,} / {n_val:,} (seed {seed}, {val_fraction:.0%} held out) |",
        "",
        f"**Roles:** {roles}  ",
        f"**Turns per row** (without system): {t['min']}–{t['max']}, mean {t['mean']}",
    ]
    if report.json_check is not None:
        jc = report.json_check
        if jc["failed"]:
            rows = ", ".join(map(str, jc["failed_rows"][:20]))
            more = ", …" if jc["failed"] > 20 else ""
            lines.append(
                f"\n**JSON check:** {jc['passed']:,} of {jc['checked']:,} rows have JSON"
                f" replies; {jc['failed']:,} fail ({report.unit}s {rows}{more})."
            )
        else:
            lines.append(f"\n**JSON check:** all {jc['checked']:,} rows have JSON replies.")
    if report.invalid:
        listed = "listed below"
        if len(report.errors) > MAX_TABLE_ROWS:
            listed = f"the first {MAX_TABLE_ROWS:,} reasons are listed below"
        noun = "row is" if report.invalid == 1 else "rows are"
        lines.append("\n" + _box("warn", f"{report.invalid:,} invalid {noun} left out ({listed})."))
    return "\n".join(lines)


def _errors_df(report: data.DatasetReport) -> Any:
    import pandas as pd

    rows = [
        {report.unit: e.line, "field": e.field, "reason": e.message}
        for e in report.errors[:MAX_TABLE_ROWS]
    ]
    return pd.DataFrame(rows, columns=[report.unit, "field", "reason"])


def _token_md(stats: dict[str, Any], model: str) -> str:
    if not stats.get("rows"):
        return "No valid rows to measure."
    over = stats["over_max_len"]
    cut = (
        _box(
            "warn", f"**{over:,} rows are longer than {stats['max_len']} tokens** and will be cut."
        )
        if over
        else _box("ok", f"Every row fits in {stats['max_len']} tokens.")
    )
    return (
        f"Measured with the tokenizer and chat template of `{model}`.\n\n"
        f"**p50** {stats['p50']:,} · **p95** {stats['p95']:,} · **max** {stats['max']:,} tokens"
        f" · {stats['total_tokens']:,} tokens in all\n\n{cut}"
    )


def _pii_md(scan: Any) -> str:
    if not scan.findings:
        return _box("ok", f"No PII found in {scan.total_rows:,} rows.")
    counts = " · ".join(f"{k} {n:,}" for k, n in sorted(scan.counts.items()))
    shown = (
        f" (the table lists the first {MAX_TABLE_ROWS:,})"
        if len(scan.findings) > MAX_TABLE_ROWS
        else ""
    )
    return _box(
        "warn",
        f"**{len(scan.findings):,} possible PII findings in {len(scan.rows_with_pii):,} rows**:"
        f" {counts}{shown}. Redact them into a cleaned copy, or drop those rows. Your file is never"
        " changed; the cleaned copy becomes the dataset to train on.",
    )


def _pii_df(scan: Any, unit: str) -> Any:
    import pandas as pd

    table = scan.table(limit=MAX_TABLE_ROWS)
    return pd.DataFrame(
        [[r["row"], r["where"], r["kind"], r["masked"]] for r in table],
        columns=[unit, "where", "kind", "masked"],
    )


def _rows_page(loaded: dict[str, Any] | None, query: str, page: Any) -> tuple[Any, str, int]:
    import pandas as pd

    cols = ["line", "turns", "system", "user", "assistant"]
    if not loaded:
        return pd.DataFrame(columns=cols), "", 1
    report: data.DatasetReport = loaded["report"]
    res = data.search_rows(report.rows, report.row_numbers, query, int(page or 1), PAGE_SIZE)
    df = pd.DataFrame(res["items"], columns=cols).rename(columns={"line": report.unit})
    info = f"{res['matches']:,} rows match · page {res['page']} of {res['pages']}"
    return df, info, res["page"]


# --------------------------------------------------------------------------- tab


def build_dataset_tab(ctx: dict[str, Any]) -> None:
    """Create the tab's components inside the open gr.Tab; register shared ones in ctx."""
    ui: dict[str, Any] = {}
    gr.Markdown(
        "Pick the conversations to fine-tune on: `.jsonl`, `.json`, `.csv` or `.parquet` in chat"
        " *messages*, ShareGPT or Alpaca form. The file is checked row by row; bad rows are"
        " listed and left out."
    )
    with gr.Row(equal_height=False):
        ui["upload"] = gr.File(
            label="Upload a dataset file",
            file_types=[".json", ".jsonl", ".csv", ".tsv", ".parquet"],
            type="filepath",
            height=140,
            elem_id="dataset-upload",
        )
        with gr.Column():
            ui["path"] = gr.Textbox(
                label="…or the path of a file on this computer",
                placeholder="/home/me/datasets/train.jsonl",
            )
            with gr.Row():
                ui["load"] = gr.Button("Load file", variant="primary")
                ui["sample"] = gr.Button("Load the bundled sample")
    with gr.Row():
        ui["fmt"] = gr.Dropdown(
            list(data.FORMAT_CHOICES),
            value="auto",
            label="Format",
            info="auto detects it; pick one to override",
        )
        ui["json_check"] = gr.Checkbox(
            label="Check that assistant replies are JSON",
            info="for models that must answer with a JSON object",
        )
    with gr.Accordion("Column mapping (CSV / Parquet)", open=True, visible=False) as acc:
        ui["colmap_box"] = acc
        gr.Markdown("Which column holds each Alpaca field (guessed from the column names).")
        with gr.Row():
            for fld in data.ALPACA_FIELDS:
                ui[f"col_{fld}"] = gr.Dropdown([NONE_COLUMN], value=NONE_COLUMN, label=fld)
        ui["apply_map"] = gr.Button("Apply the mapping")
    ui["status"] = gr.Markdown(
        _box("info", "No dataset loaded: training uses the bundled sample until you load one."),
        elem_id="dataset-status",
    )
    ui["summary"] = gr.Markdown(elem_id="dataset-summary")
    ui["errors"] = gr.Dataframe(
        label="Invalid rows (left out)", interactive=False, visible=False, wrap=True, max_height=300
    )
    with gr.Accordion("Token lengths", open=True):
        ui["tok_md"] = gr.Markdown(elem_id="dataset-tokens")
        ui["hist"] = gr.Plot(label="Tokens per row", show_label=False, visible=False)
    with gr.Accordion("Rows", open=True):
        with gr.Row():
            ui["search"] = gr.Textbox(label="Search", placeholder="text or a line number", scale=3)
            ui["page"] = gr.Number(label="Page", value=1, precision=0, minimum=1, scale=1)
            ui["prev"] = gr.Button("◀ Previous", scale=0)
            ui["next"] = gr.Button("Next ▶", scale=0)
        ui["page_info"] = gr.Markdown()
        ui["rows"] = gr.Dataframe(
            interactive=False,
            wrap=True,
            max_height=420,
            column_widths=["70px", "60px", "20%", "30%", "40%"],
        )
    with gr.Accordion("Chat-template preview", open=True):
        gr.Markdown(
            "The exact text the model is trained on. **Highlighted** tokens count toward the"
            " loss (assistant replies and their end-of-turn token); the rest is context."
        )
        with gr.Row():
            ui["preview_line"] = gr.Number(label="Row (line number)", precision=0, scale=1)
            ui["preview_btn"] = gr.Button("Show preview", scale=0)
        ui["preview_info"] = gr.Markdown()
        ui["preview"] = gr.HighlightedText(
            label="Training text",
            color_map={"trained": "#22c55e"},
            show_legend=True,
            combine_adjacent=True,
        )
    with gr.Accordion("Personal data (PII)", open=True):
        ui["pii_md"] = gr.Markdown(elem_id="dataset-pii")
        ui["pii_df"] = gr.Dataframe(
            label="Findings",
            interactive=False,
            visible=False,
            wrap=True,
            max_height=300,
            elem_id="dataset-pii-table",
        )
        with gr.Row():
            ui["redact"] = gr.Button("Redact into a cleaned copy", interactive=False)
            ui["drop"] = gr.Button("Drop flagged rows", interactive=False)
        ui["clean_md"] = gr.Markdown(elem_id="dataset-clean")
    ui["loaded"] = gr.State(None)  # {"report", "source", "scan", "lengths", "model", ...}
    ui["table_src"] = gr.State(None)  # the CSV/Parquet file the column mapping applies to
    ctx["dataset.path"] = gr.State("")
    ctx["dataset.format"] = gr.State("auto")
    ctx["dataset.pii_count"] = gr.State(0)  # the sample's count is set when a page loads
    ctx["dataset._ui"] = ui


def wire_dataset_tab(ctx: dict[str, Any]) -> None:
    """Attach events that involve other tabs' components (all tabs exist by now)."""
    ui = ctx["dataset._ui"]
    ds_path, ds_format = ctx["dataset.path"], ctx["dataset.format"]
    ds_pii = ctx["dataset.pii_count"]
    colmap_cs = [ui[f"col_{f}"] for f in data.ALPACA_FIELDS]
    # Other tabs' settings ride along at the end of each input list when they exist.
    others = {
        key: ctx[name]
        for key, name in (
            ("model", "model.name"),
            ("max_len", "train.max_seq_len"),
            ("val_fraction", "train.val_fraction"),
            ("seed", "train.seed"),
        )
        if name in ctx
    }
    extra = list(others.values())
    settings = [ui["fmt"], ui["json_check"], *colmap_cs, *extra]
    outputs = [
        *(ui[k] for k in ("status", "summary", "errors", "tok_md", "hist", "rows", "page_info")),
        *(ui[k] for k in ("page", "search", "colmap_box", "preview_line", "preview_info")),
        *(ui[k] for k in ("preview", "pii_md", "pii_df", "redact", "drop", "clean_md", "path")),
        ui["upload"],
        *colmap_cs,
        ui["table_src"],
        ui["loaded"],
        ds_path,
        ds_format,
        ds_pii,
    ]

    def other_tabs(values: list[Any]) -> dict[str, Any]:
        """model, max_len, val_fraction and seed from the trailing extra inputs."""
        got = dict(zip(others, values, strict=True))
        return {
            "model": got.get("model"),
            "max_len": _max_len(got.get("max_len")),
            "val_fraction": _number(got.get("val_fraction"), data.DEFAULT_VAL_FRACTION),
            "seed": int(_number(got.get("seed"), data.DEFAULT_SEED)),
        }

    def read_settings(args: tuple[Any, ...]) -> dict[str, Any]:
        n = len(colmap_cs)
        fmt, json_check, cols, rest = args[0], args[1], args[2 : 2 + n], args[2 + n :]
        cmap = {
            f: (c if c and c != NONE_COLUMN else None)
            for f, c in zip(data.ALPACA_FIELDS, cols, strict=True)
        }
        return {
            "fmt": fmt or "auto",
            "json_check": bool(json_check),
            "column_map": cmap,
            **other_tabs(list(rest)),
        }

    def failed(display: str, message: str) -> dict[Any, Any]:
        gr.Warning(message)
        return {ui["status"]: _box("error", f"Could not load **{display}**: {message}")}

    def load(
        path: Path,
        display: str,
        opts: dict[str, Any],
        column_map: dict[str, str | None] | None = None,
        *,
        keep_copy: bool = False,
        note: str = "",
    ) -> dict[Any, Any]:
        """Load `path` and fill every panel; on failure only the status line changes."""
        try:
            t0 = time.perf_counter()
            tok, model_name = _tokenizer(opts["model"])
            report = data.load_dataset_file(path, opts["fmt"], column_map, tok, opts["json_check"])
            source = data.store_upload(path) if keep_copy else path
            train_path, train_fmt = source, report.format
            if report.rows and _edited_map(report, column_map):
                # The run config holds no column map: give training exactly the rows shown.
                from studio import paths

                stamp = time.strftime("%Y%m%d-%H%M%S")
                dest = paths.datasets_dir() / f"{path.stem}.mapped-{stamp}.jsonl"
                train_path, train_fmt = data.write_normalized(report.rows, dest), "messages"
            scan = _scan(report, train_path)
            lengths = data.token_lengths(report.rows, tok) if tok is not None else []
            elapsed = time.perf_counter() - t0
        except data.DatasetError as exc:
            # A table whose columns could not be mapped: show the mapping controls to fix it.
            return {**failed(display, str(exc)), **table_controls(path, display, keep_copy)}
        except Exception as exc:  # never a traceback in the page
            log.exception("loading %s failed", path)
            return failed(display, f"{type(exc).__name__}: {exc}")
        is_sample = Path(train_path).resolve() == data.SAMPLE_DATASET
        loaded = {
            "report": report,
            "source": str(source),
            "train_path": str(train_path),
            "display": display,
            "scan": scan,
            "lengths": lengths,
            "model": model_name,
        }
        out = fill(loaded, opts, tok is not None)
        status = (
            f"Loaded **{display}** in {elapsed:.1f} s: {report.valid:,} of {report.total:,}"
            f" rows usable. Training will use `{train_path}`."
        )
        kind = "ok" if report.valid else "warn"
        if not report.valid:
            status += " **No row is usable**: fix the file (see the invalid rows) or the format."
        out[ui["status"]] = _box(kind, status)
        if tok is None:
            out[ui["status"]] += "\n\n" + _box(
                "warn",
                "Token lengths, the preview and the chat-template check need the model's"
                f" tokenizer, which is not available ({model_name}).",
            )
        out[ui["path"]] = "" if is_sample else str(source)
        if not keep_copy:
            out[ui["upload"]] = None  # the file shown there is no longer the one loaded
        out[ui["clean_md"]] = note
        out[ui["table_src"]] = (
            {"path": str(source), "display": display, "keep_copy": False}
            if report.column_map is not None
            else None
        )
        out[ds_path] = "" if is_sample else str(train_path)
        out[ds_format] = train_fmt
        out[ds_pii] = len(scan.findings) if scan is not None else 0
        return out

    def fill(loaded: dict[str, Any], opts: dict[str, Any], have_tok: bool) -> dict[Any, Any]:
        report: data.DatasetReport = loaded["report"]
        scan = loaded["scan"]
        out: dict[Any, Any] = {
            ui["summary"]: _summary_md(
                report, loaded["display"], opts["val_fraction"], opts["seed"]
            ),
            ui["errors"]: gr.update(value=_errors_df(report), visible=bool(report.errors)),
            **token_outputs(loaded, opts["max_len"]),
        }
        df, info, page = _rows_page(loaded, "", 1)
        out.update({ui["rows"]: df, ui["page_info"]: info, ui["page"]: page, ui["search"]: ""})
        cols = [NONE_COLUMN, *(report.columns or [])]
        out[ui["colmap_box"]] = gr.update(visible=report.column_map is not None)
        for fld in data.ALPACA_FIELDS:
            value = (report.column_map or {}).get(fld) or NONE_COLUMN
            out[ui[f"col_{fld}"]] = gr.update(choices=cols, value=value)
        out[ui["preview_line"]] = report.row_numbers[0] if report.row_numbers else None
        out[ui["preview_info"]] = "Pick a row and press **Show preview**." if have_tok else ""
        out[ui["preview"]] = None
        flagged = bool(scan and scan.findings)
        if scan is None:
            out[ui["pii_md"]] = _box("warn", "The PII check is not available.")
            out[ui["pii_df"]] = gr.update(visible=False)
        else:
            out[ui["pii_md"]] = _pii_md(scan)
            out[ui["pii_df"]] = gr.update(value=_pii_df(scan, report.unit), visible=flagged)
        out[ui["redact"]] = gr.update(interactive=flagged)
        out[ui["drop"]] = gr.update(interactive=flagged)
        out[ui["loaded"]] = loaded
        return out

    def token_outputs(loaded: dict[str, Any] | None, max_len: int) -> dict[Any, Any]:
        if not loaded:
            return {}
        if not loaded["lengths"]:
            msg = "Token lengths are not available (no tokenizer, or no valid rows)."
            return {
                ui["tok_md"]: _box("warn", msg),
                ui["hist"]: gr.update(value=None, visible=False),
            }
        stats = data.length_stats(loaded["lengths"], max_len)
        return {
            ui["tok_md"]: _token_md(stats, loaded["model"]),
            ui["hist"]: gr.update(value=data.length_histogram(stats), visible=True),
        }

    def on_load(path_text: str, *args: Any) -> dict[Any, Any]:
        try:
            path = _resolve_user_path(path_text)
        except data.DatasetError as exc:
            return failed(path_text.strip() or "the file", str(exc))
        return load(path, path.name, read_settings(args))

    def on_sample(*args: Any) -> dict[Any, Any]:
        opts = {**read_settings(args), "fmt": "auto"}
        return load(data.SAMPLE_DATASET, "the bundled sample (support_tickets.jsonl)", opts)

    def on_upload(file: str | None, *args: Any) -> dict[Any, Any]:
        if not file:
            return {ui["status"]: gr.update()}  # an empty dict reads as one missing value
        path = Path(file)
        return load(path, path.name, read_settings(args), keep_copy=True)

    def on_reload(loaded: dict[str, Any] | None, *args: Any) -> dict[Any, Any]:
        """The current file again, with the changed format, JSON check or model."""
        if not loaded:
            return {ui["status"]: gr.update()}  # an empty dict reads as one missing value
        report: data.DatasetReport = loaded["report"]
        return load(
            Path(loaded["source"]), loaded["display"], read_settings(args), report.column_map
        )

    def table_controls(path: Path, display: str, keep_copy: bool) -> dict[Any, Any]:
        try:
            columns = data.table_columns(path)
        except data.DatasetError:
            columns = None
        if not columns:
            return {}
        guess = data.guess_column_map(columns)
        out: dict[Any, Any] = {
            ui["colmap_box"]: gr.update(visible=True),
            ui["table_src"]: {"path": str(path), "display": display, "keep_copy": keep_copy},
        }
        for fld in data.ALPACA_FIELDS:
            value = guess.get(fld) or NONE_COLUMN
            out[ui[f"col_{fld}"]] = gr.update(choices=[NONE_COLUMN, *columns], value=value)
        return out

    def on_apply_map(src: dict[str, Any] | None, *args: Any) -> dict[Any, Any]:
        if not src:
            return {ui["status"]: _box("info", "Load a CSV or Parquet file first.")}
        opts = read_settings(args)
        path = Path(src["path"])
        return load(path, src["display"], opts, opts["column_map"], keep_copy=src["keep_copy"])

    def on_other(loaded: dict[str, Any] | None, *values: Any) -> dict[Any, Any]:
        """Max length, validation share or seed changed: redo the figures that use them."""
        if not loaded:
            return {}
        opts = other_tabs(list(values))
        report = loaded["report"]
        summary = _summary_md(report, loaded["display"], opts["val_fraction"], opts["seed"])
        return {ui["summary"]: summary, **token_outputs(loaded, opts["max_len"])}

    def on_page(loaded: dict[str, Any] | None, query: str, page: Any, step: int = 0) -> Any:
        return _rows_page(loaded, query, int(page or 1) + step)

    def on_preview(loaded: dict[str, Any] | None, line: Any, *rest: Any) -> tuple[str, Any]:
        if not loaded:
            return _box("info", "Load a dataset first."), None
        opts = other_tabs(list(rest))
        return _preview(loaded, line, opts["model"], opts["max_len"])

    def on_clean(loaded: dict[str, Any] | None, action: str, *args: Any) -> dict[Any, Any]:
        scan = loaded["scan"] if loaded else None
        if not scan or not scan.findings:
            return {ui["clean_md"]: _box("info", "Nothing to clean.")}
        from studio.data import pii

        report: data.DatasetReport = loaded["report"]
        try:
            result = pii.write_cleaned(report.rows, loaded["train_path"], action)
        except Exception as exc:
            log.exception("cleaning failed")
            return {ui["clean_md"]: _box("error", f"Could not write the cleaned copy: {exc}")}
        what = "PII replaced by placeholders" if action == "redact" else "flagged rows dropped"
        note = _box(
            "ok",
            f"Cleaned copy written ({what}): `{result.path}`, {result.rows_written:,} rows,"
            f" {result.findings_fixed:,} findings fixed. It is now the dataset to train on;"
            f" the original `{loaded['source']}` is unchanged.",
        )
        opts = {**read_settings(args), "fmt": "messages"}
        return load(Path(result.path), Path(result.path).name, opts, note=note)

    ui["load"].click(on_load, [ui["path"], *settings], outputs)
    ui["path"].submit(on_load, [ui["path"], *settings], outputs)
    ui["sample"].click(on_sample, settings, outputs)
    ui["upload"].upload(on_upload, [ui["upload"], *settings], outputs)
    ui["fmt"].input(on_reload, [ui["loaded"], *settings], outputs)
    ui["json_check"].input(on_reload, [ui["loaded"], *settings], outputs)
    ui["apply_map"].click(on_apply_map, [ui["table_src"], *settings], outputs)
    if "model" in others:
        others["model"].change(on_reload, [ui["loaded"], *settings], outputs)
    for key in ("max_len", "val_fraction", "seed"):
        if key in others:
            others[key].change(
                on_other, [ui["loaded"], *extra], [ui["summary"], ui["tok_md"], ui["hist"]]
            )
    page_in = [ui["loaded"], ui["search"], ui["page"]]
    page_out = [ui["rows"], ui["page_info"], ui["page"]]
    ui["search"].submit(lambda ld, q, _p: on_page(ld, q, 1), page_in, page_out)
    ui["page"].submit(on_page, page_in, page_out)
    ui["prev"].click(lambda ld, q, p: on_page(ld, q, p, -1), page_in, page_out)
    ui["next"].click(lambda ld, q, p: on_page(ld, q, p, 1), page_in, page_out)
    preview_in = [ui["loaded"], ui["preview_line"], *extra]
    preview_out = [ui["preview_info"], ui["preview"]]
    ui["preview_btn"].click(on_preview, preview_in, preview_out)
    ui["preview_line"].submit(on_preview, preview_in, preview_out)
    clean_in = [ui["loaded"], *settings]
    if ctx.get("demo") is not None:
        # An event output (unlike a State's initial value) fires the Train tab's .change.
        ctx["demo"].load(_sample_pii_count, None, ds_pii)
    ui["redact"].click(lambda ld, *a: on_clean(ld, "redact", *a), clean_in, outputs)
    ui["drop"].click(lambda ld, *a: on_clean(ld, "drop", *a), clean_in, outputs)


def _sample_pii_count() -> int:
    """Unresolved PII in the bundled sample, the dataset training uses until another is loaded."""
    try:
        from studio.data import pii

        cached = pii.unresolved_pii(data.SAMPLE_DATASET)
        if cached is not None:
            return cached
        report = data.load_dataset_file(data.SAMPLE_DATASET)
        scan = pii.scan_rows(report.rows, report.row_numbers)
        pii.save_scan(data.SAMPLE_DATASET, scan)
        return len(scan.findings)
    except Exception:
        log.exception("could not scan the bundled sample for PII")
        return 0


def _edited_map(report: data.DatasetReport, column_map: dict[str, str | None] | None) -> bool:
    """True when the user's column map differs from the guess training would make."""
    if report.column_map is None or column_map is None or report.columns is None:
        return False
    chosen = {k: v for k, v in column_map.items() if v}
    guess = {k: v for k, v in data.guess_column_map(report.columns).items() if v}
    return chosen != guess


def _scan(report: data.DatasetReport, train_path: Path) -> Any:
    """PII scan of the valid rows, cached with the file training will read."""
    try:
        from studio.data import pii
    except ImportError as exc:
        log.warning("PII check unavailable: %s", exc)
        return None
    scan = pii.scan_rows(report.rows, report.row_numbers)
    try:
        pii.save_scan(train_path, scan)
    except OSError as exc:  # the cache is a convenience; the result is shown anyway
        log.warning("could not cache the PII scan: %s", exc)
    return scan


def _preview(loaded: dict[str, Any], line: Any, model: str | None, max_len: int) -> tuple[str, Any]:
    """Info line and HighlightedText value for one row (by its line number)."""
    from studio.data import chat_format

    report: data.DatasetReport = loaded["report"]
    try:
        idx = report.row_numbers.index(int(line))
    except (TypeError, ValueError):
        msg = f"{report.unit} {line} is not a valid row of this dataset (see the invalid rows)."
        return _box("warn", msg), None
    tok, model_name = _tokenizer(model)
    if tok is None:
        msg = f"The preview needs the model's tokenizer, which is not available ({model_name})."
        return _box("warn", msg), None
    row = report.rows[idx]
    try:
        segments = data.preview_row(row, tok, max_len)
        tc = chat_format.tokenize_conversation(tok, row["messages"], max_len)
    except Exception as exc:
        log.exception("preview failed")
        return _box("error", f"Preview failed: {type(exc).__name__}: {exc}"), None
    info = (
        f"{report.unit} {line}: {len(tc.input_ids):,} tokens, {tc.trained_tokens:,} of them"
        f" trained (chat template of `{model_name}`)."
    )
    if tc.truncated:
        info += " " + _box("warn", f"Cut at {max_len} tokens: the rest is not trained.")
    return info, [(text, "trained" if trained else None) for text, trained in segments]
