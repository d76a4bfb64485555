"""Dataset tab: pick a file, see whether it is usable, what training will see, and clean PII.

A thin layer over `studio.data` (`scan.inspect_file` loads, maps, scans and measures a file;
`load` validates and previews; `pii` redacts and drops). Shares with other tabs, as gr.State:
"dataset.path" (the file training reads; "" means the bundled sample), "dataset.format" and
"dataset.pii_count" (unresolved PII findings in that file). Reads "model.name" (tokenizer),
"train.max_seq_len", "train.val_fraction" and "train.seed" when present.

Handlers read their inputs as a dict keyed by component and return dicts keyed by component,
so adding a control touches only the handlers that use it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from studio.data import hub
from studio.data import load as data
from studio.data import scan as ds_scan
from studio.data.normalize import ALPACA_FIELDS, FORMAT_CHOICES
from studio.data.search import search_rows
from studio.data.split import DEFAULT_SEED, DEFAULT_VAL_FRACTION, split_sizes
from studio.data.table import guess_column_map, table_columns
from studio.data.tokens import DEFAULT_MAX_LEN, length_stats, preview_row
from studio.models.loader import cached_tokenizer

log = logging.getLogger(__name__)

NONE_COLUMN = "(none)"
PAGE_SIZE = 20
MAX_TABLE_ROWS = 1000  # invalid-row and PII tables show this many; the counts show all
# What a (re)load fills, by component name; the column dropdowns and shared states come on top.
LOAD_OUTPUTS = (
    "status",
    "summary",
    "errors",
    "tok_md",
    "hist",
    "rows",
    "page_info",
    "page",
    "search",
    "colmap_box",
    "preview_line",
    "preview_info",
    "preview",
    "pii_md",
    "pii_df",
    "redact",
    "drop",
    "clean_md",
    "path",
    "upload",
    "table_src",
    "loaded",
)
# Other tabs' settings this tab reads: (key here, ctx name).
OTHER_TABS = (
    ("model", "model.name"),
    ("max_len", "train.max_seq_len"),
    ("val_fraction", "train.val_fraction"),
    ("seed", "train.seed"),
)


# --------------------------------------------------------------------------- helpers


def _number(value: Any, default: float) -> float:
    try:
        return float(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _max_len(value: Any) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return DEFAULT_MAX_LEN
    return n if n > 0 else DEFAULT_MAX_LEN


def _box(kind: str, text: str) -> str:
    # Plain symbols, not emoji: they render without an emoji font.
    icon = {"error": "✖ **Error:**", "warn": "⚠", "ok": "✔", "info": "ℹ"}[kind]
    return f"{icon} {text}"


def _summary_md(
    report: data.DatasetReport,
    name: str,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
) -> str:
    n_train, n_val = split_sizes(report.valid, val_fraction)
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
    if report.format == "preference":
        pref = report.summary()["preference"]
        lines.append(
            f"\n**Preference pairs:** {pref['pairs']:,}; answers average"
            f" {pref['chosen_chars_mean']:.0f} characters chosen,"
            f" {pref['rejected_chars_mean']:.0f} rejected; the chosen one is longer in"
            f" {pref['chosen_longer']:,}. Train with the objective **DPO** (Train tab)."
        )
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
    for note in report.notes:  # tool rows left out, OpenAI 'name' ignored, weight-0 replies
        lines.append("\n" + _box("info", note))
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
    res = search_rows(report.rows, report.row_numbers, query, int(page or 1), PAGE_SIZE)
    df = pd.DataFrame(res["items"], columns=cols).rename(columns={"line": report.unit})
    info = f"{res['matches']:,} rows match · page {res['page']} of {res['pages']}"
    return df, info, res["page"]


# --------------------------------------------------------------------------- build


def build_dataset_tab(ctx: dict[str, Any]) -> dict[str, Any]:
    """Create the tab's components inside the open gr.Tab; returns them by name.

    Registers the shared states ("dataset.path", "dataset.format", "dataset.pii_count") in ctx.
    """
    ui: dict[str, Any] = {}
    gr.Markdown(
        "Pick the conversations to fine-tune on: `.jsonl`, `.json`, `.csv` or `.parquet` in chat"
        " *messages* (OpenAI's format too, with `weight`), ShareGPT or Alpaca form, in UTF-8 or"
        " Excel's UTF-16. The file is checked row by row; bad rows are listed and left out."
    )
    _build_source(ui)
    _build_report(ui)
    _build_preview_and_pii(ui)
    ui["loaded"] = gr.State(None)  # {"report", "source", "scan", "lengths", "model", ...}
    ui["table_src"] = gr.State(None)  # the CSV/Parquet file the column mapping applies to
    ctx["dataset.path"] = gr.State("")
    ctx["dataset.format"] = gr.State("auto")
    ctx["dataset.pii_count"] = gr.State(0)  # the sample's count is set when a page loads
    return ui


def _build_source(ui: dict[str, Any]) -> None:
    """Upload, path, format, JSON check and the column mapping of a table."""
    with gr.Row(equal_height=False):
        ui["upload"] = gr.File(
            label="Upload a dataset file",
            file_types=[".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet"],
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
                ui["sample_pref"] = gr.Button(
                    "Load the preference sample (DPO)", elem_id="dataset-sample-pref"
                )
    with gr.Accordion("…or a Hugging Face dataset by name", open=False):
        with gr.Row():
            ui["hub_id"] = gr.Textbox(
                label="Dataset id (or a local dataset folder)",
                placeholder="tatsu-lab/alpaca",
                info="a folder save_to_disk wrote, or a folder of data files",
                scale=3,
                elem_id="dataset-hub-id",
            )
            ui["hub_split"] = gr.Textbox(label="Split", value="train", scale=1)
            ui["hub_map"] = gr.Textbox(
                label="Column map (field=column, ...)",
                placeholder="instruction=question, output=answer",
                info="only for columns not already named instruction/input/output/messages",
                scale=3,
            )
        ui["hub_load"] = gr.Button("Load from the hub", elem_id="dataset-hub-load")
    with gr.Row():
        ui["fmt"] = gr.Dropdown(
            list(FORMAT_CHOICES),
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
            for fld in ALPACA_FIELDS:
                ui[f"col_{fld}"] = gr.Dropdown([NONE_COLUMN], value=NONE_COLUMN, label=fld)
        ui["apply_map"] = gr.Button("Apply the mapping")


def _build_report(ui: dict[str, Any]) -> None:
    """Status, summary, invalid rows, token lengths and the searchable rows."""
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


def _build_preview_and_pii(ui: dict[str, Any]) -> None:
    """The chat-template preview of one row, and the PII findings with Redact / Drop."""
    with gr.Accordion("Chat-template preview", open=True):
        gr.Markdown(
            "The exact text the model is trained on. **Highlighted** tokens count toward the"
            " loss (assistant replies and their end-of-turn token); the rest is context."
        )
        with gr.Row():
            ui["preview_line"] = gr.Number(label="Row (line number)", precision=0, scale=1)
            ui["preview_btn"] = gr.Button("Show preview", scale=0)
        ui["preview_info"] = gr.Markdown(elem_id="dataset-preview-info")
        ui["preview"] = gr.HighlightedText(
            label="Training text",
            elem_id="dataset-preview",
            # a preference pair shows both answers as the model sees them
            color_map={"trained": "#22c55e", "chosen": "#22c55e", "rejected": "#ef4444"},
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


# --------------------------------------------------------------------------- wiring


@dataclass
class DatasetWiring:
    """The tab's components by name, other tabs' settings it reads, and the shared states."""

    ui: dict[str, Any]
    others: dict[str, Any] = field(default_factory=dict)  # OTHER_TABS keys -> components
    shared_path: Any = None
    shared_format: Any = None
    shared_pii: Any = None

    @property
    def columns(self) -> list[Any]:
        return [self.ui[f"col_{fld}"] for fld in ALPACA_FIELDS]

    def settings(self) -> set[Any]:
        """What every (re)load reads: format, JSON check, column map, other tabs' settings."""
        return {self.ui["fmt"], self.ui["json_check"], *self.columns, *self.others.values()}

    def outputs(self) -> list[Any]:
        """Everything a (re)load may fill; handlers return a dict with any subset of it."""
        shared = [self.shared_path, self.shared_format, self.shared_pii]
        return [*(self.ui[k] for k in LOAD_OUTPUTS), *self.columns, *shared]

    def other_tabs(self, values: dict[Any, Any]) -> dict[str, Any]:
        """model, max_len, val_fraction and seed (defaults where a tab is missing)."""
        got = {key: values.get(comp) for key, comp in self.others.items()}
        return {
            "model": got.get("model"),
            "max_len": _max_len(got.get("max_len")),
            "val_fraction": _number(got.get("val_fraction"), DEFAULT_VAL_FRACTION),
            "seed": int(_number(got.get("seed"), DEFAULT_SEED)),
        }

    def read_settings(self, values: dict[Any, Any]) -> dict[str, Any]:
        cmap = {}
        for fld in ALPACA_FIELDS:
            chosen = values.get(self.ui[f"col_{fld}"])
            cmap[fld] = chosen if chosen and chosen != NONE_COLUMN else None
        return {
            "fmt": values.get(self.ui["fmt"]) or "auto",
            "json_check": bool(values.get(self.ui["json_check"])),
            "column_map": cmap,
            **self.other_tabs(values),
        }


def wire_dataset_tab(ctx: dict[str, Any], ui: dict[str, Any]) -> None:
    """Attach the tab's events; other tabs' settings are read when those tabs exist."""
    w = DatasetWiring(
        ui,
        {key: ctx[name] for key, name in OTHER_TABS if name in ctx},
        ctx["dataset.path"],
        ctx["dataset.format"],
        ctx["dataset.pii_count"],
    )
    settings, outputs = w.settings(), w.outputs()
    ui["load"].click(partial(on_load, w), {ui["path"], *settings}, outputs)
    ui["path"].submit(partial(on_load, w), {ui["path"], *settings}, outputs)
    ui["sample"].click(partial(on_sample, w), settings, outputs)
    ui["sample_pref"].click(partial(on_preference_sample, w), settings, outputs)
    hub_in = {ui["hub_id"], ui["hub_split"], ui["hub_map"], *settings}
    ui["hub_load"].click(partial(on_hub, w), hub_in, outputs)
    ui["upload"].upload(partial(on_upload, w), {ui["upload"], *settings}, outputs)
    reload_in = {ui["loaded"], *settings}
    ui["fmt"].input(partial(on_reload, w), reload_in, outputs)
    ui["json_check"].input(partial(on_reload, w), reload_in, outputs)
    ui["apply_map"].click(partial(on_apply_map, w), {ui["table_src"], *settings}, outputs)
    if "model" in w.others:
        w.others["model"].change(partial(on_reload, w), reload_in, outputs)
    for key in ("max_len", "val_fraction", "seed"):
        if key in w.others:
            w.others[key].change(
                partial(on_other, w),
                {ui["loaded"], *w.others.values()},
                [ui["summary"], ui["tok_md"], ui["hist"]],
            )
    _wire_rows_and_preview(w)
    clean_in = {ui["loaded"], *settings}
    if ctx.get("demo") is not None:
        # An event output (unlike a State's initial value) fires the Train tab's .change.
        ctx["demo"].load(ds_scan.sample_pii_count, None, w.shared_pii)
    ui["redact"].click(partial(on_clean, w, "redact"), clean_in, outputs)
    ui["drop"].click(partial(on_clean, w, "drop"), clean_in, outputs)


def _wire_rows_and_preview(w: DatasetWiring) -> None:
    ui = w.ui
    page_in = [ui["loaded"], ui["search"], ui["page"]]
    page_out = [ui["rows"], ui["page_info"], ui["page"]]
    ui["search"].submit(lambda ld, q, _p: _rows_page(ld, q, 1), page_in, page_out)
    ui["page"].submit(_rows_page, page_in, page_out)
    ui["prev"].click(lambda ld, q, p: _rows_page(ld, q, int(p or 1) - 1), page_in, page_out)
    ui["next"].click(lambda ld, q, p: _rows_page(ld, q, int(p or 1) + 1), page_in, page_out)
    preview_in = {ui["loaded"], ui["preview_line"], *w.others.values()}
    preview_out = [ui["preview_info"], ui["preview"]]
    ui["preview_btn"].click(partial(on_preview, w), preview_in, preview_out)
    ui["preview_line"].submit(partial(on_preview, w), preview_in, preview_out)


# --------------------------------------------------------------------------- handlers


def _failed(w: DatasetWiring, display: str, message: str) -> dict[Any, Any]:
    gr.Warning(message)
    return {w.ui["status"]: _box("error", f"Could not load **{display}**: {message}")}


def _load(
    w: DatasetWiring,
    path: Path,
    display: str,
    opts: dict[str, Any],
    column_map: dict[str, str | None] | None = None,
    *,
    keep_copy: bool = False,
    note: str = "",
) -> dict[Any, Any]:
    """Load `path` and fill every panel; on failure only the status line changes."""
    tok, model_name = cached_tokenizer(opts["model"])
    try:
        ins = ds_scan.inspect_file(
            path, opts["fmt"], column_map, tok, opts["json_check"], keep_copy=keep_copy
        )
    except data.DatasetError as exc:
        # A table whose columns could not be mapped: show the mapping controls to fix it.
        return {**_failed(w, display, str(exc)), **_table_controls(w, path, display, keep_copy)}
    except Exception as exc:  # never a traceback in the page
        log.exception("loading %s failed", path)
        return _failed(w, display, f"{type(exc).__name__}: {exc}")
    loaded = {
        "report": ins.report,
        "source": str(ins.source),
        "train_path": str(ins.train_path),
        "display": display,
        "scan": ins.scan,
        "lengths": ins.lengths,
        "model": model_name,
    }
    ui = w.ui
    out = _fill(w, loaded, opts, tok is not None)
    out[ui["status"]] = _load_status(ins, display, None if tok is not None else model_name)
    out[ui["path"]] = "" if ins.is_sample else str(ins.source)
    if not keep_copy:
        out[ui["upload"]] = None  # the file shown there is no longer the one loaded
    out[ui["clean_md"]] = note
    out[ui["table_src"]] = (
        {"path": str(ins.source), "display": display, "keep_copy": False}
        if ins.report.column_map is not None
        else None
    )
    out[w.shared_path] = "" if ins.is_sample else str(ins.train_path)
    out[w.shared_format] = ins.train_format
    out[w.shared_pii] = ins.pii_count
    return out


def _load_status(ins: ds_scan.Inspection, display: str, no_tokenizer: str | None) -> str:
    """The status line after a load; `no_tokenizer` is why the tokenizer is missing, if it is."""
    report = ins.report
    status = (
        f"Loaded **{display}** in {ins.seconds:.1f} s: {report.valid:,} of {report.total:,}"
        f" rows usable. Training will use `{ins.train_path}`."
    )
    if not report.valid:
        status += " **No row is usable**: fix the file (see the invalid rows) or the format."
    text = _box("ok" if report.valid else "warn", status)
    if no_tokenizer is not None:
        text += "\n\n" + _box(
            "warn",
            "Token lengths, the preview and the chat-template check need the model's"
            f" tokenizer, which is not available ({no_tokenizer}).",
        )
    return text


def _fill(
    w: DatasetWiring, loaded: dict[str, Any], opts: dict[str, Any], have_tok: bool
) -> dict[Any, Any]:
    """Every panel for a freshly loaded dataset."""
    ui = w.ui
    report: data.DatasetReport = loaded["report"]
    scan = loaded["scan"]
    out: dict[Any, Any] = {
        ui["summary"]: _summary_md(report, loaded["display"], opts["val_fraction"], opts["seed"]),
        ui["errors"]: gr.update(value=_errors_df(report), visible=bool(report.errors)),
        **_token_outputs(w, loaded, opts["max_len"]),
    }
    df, info, page = _rows_page(loaded, "", 1)
    out.update({ui["rows"]: df, ui["page_info"]: info, ui["page"]: page, ui["search"]: ""})
    cols = [NONE_COLUMN, *(report.columns or [])]
    out[ui["colmap_box"]] = gr.update(visible=report.column_map is not None)
    for fld in ALPACA_FIELDS:
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


def _token_outputs(w: DatasetWiring, loaded: dict[str, Any] | None, max_len: int) -> dict:
    from studio.plots import length_histogram

    ui = w.ui
    if not loaded:
        return {}
    if not loaded["lengths"]:
        msg = "Token lengths are not available (no tokenizer, or no valid rows)."
        return {ui["tok_md"]: _box("warn", msg), ui["hist"]: gr.update(value=None, visible=False)}
    stats = length_stats(loaded["lengths"], max_len)
    return {
        ui["tok_md"]: _token_md(stats, loaded["model"]),
        ui["hist"]: gr.update(value=length_histogram(stats), visible=True),
    }


def _table_controls(w: DatasetWiring, path: Path, display: str, keep_copy: bool) -> dict:
    """The column-mapping controls for a table that failed to load as guessed."""
    try:
        columns = table_columns(path)
    except data.DatasetError:
        columns = None
    if not columns:
        return {}
    guess = guess_column_map(columns)
    out: dict[Any, Any] = {
        w.ui["colmap_box"]: gr.update(visible=True),
        w.ui["table_src"]: {"path": str(path), "display": display, "keep_copy": keep_copy},
    }
    for fld in ALPACA_FIELDS:
        value = guess.get(fld) or NONE_COLUMN
        out[w.ui[f"col_{fld}"]] = gr.update(choices=[NONE_COLUMN, *columns], value=value)
    return out


def on_load(w: DatasetWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    path_text = values.get(w.ui["path"]) or ""
    try:
        path = ds_scan.resolve_user_path(path_text)
    except data.DatasetError as exc:
        return _failed(w, path_text.strip() or "the file", str(exc))
    return _load(w, path, path.name, w.read_settings(values))


def on_sample(w: DatasetWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    return _load_sample(w, data.SAMPLE_DATASET, values)


def on_preference_sample(w: DatasetWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    return _load_sample(w, data.SAMPLE_PREFERENCES, values)


def _load_sample(w: DatasetWiring, sample: Path, values: dict[Any, Any]) -> dict[Any, Any]:
    opts = {**w.read_settings(values), "fmt": "auto"}
    return _load(w, sample, f"the bundled sample ({sample.name})", opts)


def on_hub(w: DatasetWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    """A dataset by name: fetched into a JSONL copy, then loaded like any file (same checks,
    same PII scan); unreachable hub -> a message pointing at the local-file route."""
    name = (values.get(w.ui["hub_id"]) or "").strip()
    split = (values.get(w.ui["hub_split"]) or "train").strip()
    try:
        column_map = hub.parse_column_map(values.get(w.ui["hub_map"]))
        path = hub.fetch_dataset(name, split, column_map)
    except data.DatasetError as exc:
        return _failed(w, name or "the dataset", str(exc))
    return _load(w, path, f"{name} ({split})", w.read_settings(values))


def on_upload(w: DatasetWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    file = values.get(w.ui["upload"])
    if not file:
        return {w.ui["status"]: gr.update()}  # an empty dict reads as one missing value
    path = Path(file)
    return _load(w, path, path.name, w.read_settings(values), keep_copy=True)


def on_reload(w: DatasetWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    """The current file again, with the changed format, JSON check or model."""
    loaded = values.get(w.ui["loaded"])
    if not loaded:
        return {w.ui["status"]: gr.update()}  # an empty dict reads as one missing value
    report: data.DatasetReport = loaded["report"]
    opts = w.read_settings(values)
    return _load(w, Path(loaded["source"]), loaded["display"], opts, report.column_map)


def on_apply_map(w: DatasetWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    src = values.get(w.ui["table_src"])
    if not src:
        return {w.ui["status"]: _box("info", "Load a CSV or Parquet file first.")}
    opts = w.read_settings(values)
    path = Path(src["path"])
    return _load(w, path, src["display"], opts, opts["column_map"], keep_copy=src["keep_copy"])


def on_other(w: DatasetWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    """Max length, validation share or seed changed: redo the figures that use them."""
    loaded = values.get(w.ui["loaded"])
    if not loaded:
        return {}
    opts = w.other_tabs(values)
    summary = _summary_md(loaded["report"], loaded["display"], opts["val_fraction"], opts["seed"])
    return {w.ui["summary"]: summary, **_token_outputs(w, loaded, opts["max_len"])}


def on_preview(w: DatasetWiring, values: dict[Any, Any]) -> tuple[str, Any]:
    loaded = values.get(w.ui["loaded"])
    if not loaded:
        return _box("info", "Load a dataset first."), None
    opts = w.other_tabs(values)
    return _preview(loaded, values.get(w.ui["preview_line"]), opts["model"], opts["max_len"])


def _pair_preview(
    row: dict[str, Any], tok: Any, model_name: str, line: Any, unit: str, max_len: int
) -> tuple[str, Any]:
    """A preference pair as the model sees it: prompt + chosen, then prompt + rejected, each
    through the chat template; the answers are highlighted as chosen and rejected."""
    try:
        sides = [
            (label, preview_row(row["prompt"] + row[label], tok, max_len))
            for label in ("chosen", "rejected")
        ]
    except Exception as exc:
        log.exception("preview failed")
        return _box("error", f"Preview failed: {type(exc).__name__}: {exc}"), None
    value: list[tuple[str, str | None]] = []
    for label, segments in sides:
        value.append((f"── {label} ──\n", None))
        value += [(text, label if trained else None) for text, trained in segments]
        value.append(("\n", None))
    info = (
        f"{unit} {line}: a preference pair. DPO raises the model's probability of the"
        " **chosen** answer over the **rejected** one, relative to where it started"
        f" (chat template of `{model_name}`)."
    )
    return info, value


def on_clean(w: DatasetWiring, action: str, values: dict[Any, Any]) -> dict[Any, Any]:
    """Redact or drop the PII findings into a cleaned copy, then load that copy."""
    loaded = values.get(w.ui["loaded"])
    scan = loaded["scan"] if loaded else None
    if not scan or not scan.findings:
        return {w.ui["clean_md"]: _box("info", "Nothing to clean.")}
    from studio.data import pii

    report: data.DatasetReport = loaded["report"]
    try:
        result = pii.write_cleaned(report.rows, loaded["train_path"], action)
    except Exception as exc:
        log.exception("cleaning failed")
        return {w.ui["clean_md"]: _box("error", f"Could not write the cleaned copy: {exc}")}
    what = "PII replaced by placeholders" if action == "redact" else "flagged rows dropped"
    note = _box(
        "ok",
        f"Cleaned copy written ({what}): `{result.path}`, {result.rows_written:,} rows,"
        f" {result.findings_fixed:,} findings fixed. It is now the dataset to train on;"
        f" the original `{loaded['source']}` is unchanged.",
    )
    opts = {**w.read_settings(values), "fmt": "messages"}
    return _load(w, Path(result.path), Path(result.path).name, opts, note=note)


def _preview(loaded: dict[str, Any], line: Any, model: str | None, max_len: int) -> tuple[str, Any]:
    """Info line and HighlightedText value for one row (by its line number)."""
    from studio.data import chat_format

    report: data.DatasetReport = loaded["report"]
    try:
        idx = report.row_numbers.index(int(line))
    except (TypeError, ValueError):
        msg = f"{report.unit} {line} is not a valid row of this dataset (see the invalid rows)."
        return _box("warn", msg), None
    tok, model_name = cached_tokenizer(model)
    if tok is None:
        msg = f"The preview needs the model's tokenizer, which is not available ({model_name})."
        return _box("warn", msg), None
    row = report.rows[idx]
    if "rejected" in row:
        return _pair_preview(row, tok, model_name, line, report.unit, max_len)
    try:
        segments = preview_row(row, tok, max_len)
        tc = chat_format.tokenize_conversation(tok, row["messages"], max_len)
    except Exception as exc:
        log.exception("preview failed")
        return _box("error", f"Preview failed: {type(exc).__name__}: {exc}"), None
    info = (
        f"{report.unit} {line}: {len(tc.input_ids):,} tokens, {tc.trained_tokens:,} of them"
        f" trained (chat template of `{model_name}`)."
    )
    marker = chat_format.end_of_turn_marker(tok)
    if marker:
        info += f" Each reply ends with `{marker}`, trained so the model learns to stop."
    skipped = sum(m.get("weight") == 0 for m in row["messages"])
    if skipped:
        info += (
            f" {skipped} {'reply has' if skipped == 1 else 'replies have'} weight 0: context"
            " only, not highlighted, not trained."
        )
    if tc.truncated:
        info += " " + _box("warn", f"Cut at {max_len} tokens: the rest is not trained.")
    for note in chat_format.template_notes(tok):  # e.g. a template with no system role
        info += "\n\n" + _box("warn", note)
    return info, [(text, "trained" if trained else None) for text, trained in segments]
