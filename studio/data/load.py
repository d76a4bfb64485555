"""Load a fine-tuning dataset: read the file, normalize each row to chat messages, validate.

This is the one dataset parser: the Dataset tab, training, the benchmark and Chat's prompt
files all read through `read_records` / `load_dataset_file`. Where each step lives:

- `read.py`: the file's kind, JSON Lines and JSON (with line numbers), `DatasetError`;
- `table.py`: CSV/TSV and Parquet, and mapping columns onto Alpaca fields;
- `normalize.py`: Alpaca / ShareGPT / messages rows -> `[{"role", "content"}, ...]`;
- here: row validation (including the model's chat template) and the `DatasetReport`;
- `tokens.py`, `split.py`, `search.py`: token statistics, the train/validation split and the
  files a run trains from, the Dataset tab's row search.

Files: `.jsonl`, `.json` (an array of rows, or an object holding one), `.csv`/`.tsv` and
`.parquet`; UTF-8 with or without BOM, or UTF-16 with a BOM (Excel's "Unicode Text"), LF or
CRLF. A bad row is reported with the file's line (or row) number and left out; the good rows
stay usable. Rows that call tools are counted and left out (not supported yet), and what the
loader read but does not use (OpenAI's `name`) is one note for the file, not an error per row.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.data import chat_format
from studio.data.normalize import (
    FORMAT_CHOICES,
    ROLES,
    WEIGHT_KEY,
    Message,
    Row,
    dropped_keys,
    normalize_record,
    tool_use,
)
from studio.data.preference import normalize_preference, pair_stats
from studio.data.read import (
    DatasetError,
    Record,
    detect_format,
    file_kind,
    json_error,
    read_json,
    read_jsonl,
)
from studio.data.split import DEFAULT_SEED, DEFAULT_VAL_FRACTION, split_rows, split_sizes
from studio.data.table import read_table, table_records
from studio.runs import Run

# The API the stages use; DatasetError and Record come from read.py with the records.
__all__ = [
    "SAMPLE_DATASET",
    "SAMPLE_PREFERENCES",
    "DatasetError",
    "DatasetReport",
    "Record",
    "RowError",
    "check_json_replies",
    "load_dataset_file",
    "read_records",
    "training_row",
]

SAMPLE_DATASET = Path(__file__).resolve().parent / "sample_data" / "support_tickets.jsonl"
# The bundled preference sample (DPO): the support sample's JSON replies preferred over chatty,
# chat-wrapped or plain-text ones (sample_data/build_preferences.py says how it was made).
SAMPLE_PREFERENCES = SAMPLE_DATASET.with_name("support_preferences.jsonl")


@dataclass(frozen=True)
class RowError:
    """Why one row was left out: its line (or table row) number, the field, the reason."""

    line: int
    field: str
    message: str
    unit: str = "line"

    def __str__(self) -> str:
        where = f"{self.unit} {self.line}"
        return (
            f"{where}, {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


@dataclass
class DatasetReport:
    """The loaded dataset: valid normalized rows plus everything the Dataset tab shows."""

    path: Path
    format: str  # messages, sharegpt or alpaca
    rows: list[Row]
    row_numbers: list[int]  # the source line/row number of each valid row
    errors: list[RowError]
    total: int
    valid: int
    invalid: int
    duplicates: list[list[int]]  # groups of row numbers holding exactly the same conversation
    roles: dict[str, int]
    turns: dict[str, Any]  # min, max, mean and a {turns: rows} histogram (system turns excluded)
    json_check: dict[str, Any] | None = None
    file_kind: str = "jsonl"  # jsonl, json, csv or parquet
    unit: str = "line"  # what row_numbers count: "line" of the file, or "row" of a table
    columns: list[str] | None = None  # table columns, for CSV/Parquet
    column_map: dict[str, str | None] | None = None  # Alpaca field -> column used
    tool_rows: list[int] = field(default_factory=list)  # rows calling tools: left out, counted
    notes: list[str] = field(default_factory=list)  # what was read but not used, in plain words

    @property
    def duplicate_rows(self) -> int:
        """Rows that repeat an earlier row (a group of 3 counts 2)."""
        return sum(len(g) - 1 for g in self.duplicates)

    def summary(self) -> dict[str, Any]:
        """Plain figures for a UI or a log line."""
        n_train, n_val = split_sizes(self.valid)
        return {
            "path": str(self.path),
            "format": self.format,
            "file_kind": self.file_kind,
            "total": self.total,
            "valid": self.valid,
            "invalid": self.invalid,
            "tool_rows": len(self.tool_rows),
            "duplicate_groups": len(self.duplicates),
            "duplicate_rows": self.duplicate_rows,
            "roles": dict(self.roles),
            "turns": self.turns,
            "train_rows": n_train,
            "val_rows": n_val,
            "seed": DEFAULT_SEED,
            **({"preference": pair_stats(self.rows)} if self.format == "preference" else {}),
        }


def load_dataset_file(
    path: str | Path,
    fmt: str = "auto",
    column_map: dict[str, str | None] | None = None,
    tokenizer: Any = None,
    json_check: bool = False,
) -> DatasetReport:
    """Read, validate and normalize a dataset file; raise DatasetError if it is not one.

    `fmt` overrides the detected row format. `column_map` maps Alpaca fields to CSV/Parquet
    columns (guessed when None). With a `tokenizer`, rows whose role order the model's chat
    template rejects are left out too. `json_check` also checks that every assistant reply
    parses as JSON (reported, rows kept).
    """
    path = Path(path).expanduser()
    fmt = (fmt or "auto").strip().lower()
    if fmt not in FORMAT_CHOICES:
        raise DatasetError(f"Unknown format '{fmt}': use one of {', '.join(FORMAT_CHOICES)}.")
    kind, columns, records = read_records(path)
    used_map: dict[str, str | None] | None = None
    unit = "row" if kind == "parquet" else "line"
    if columns is not None:
        records, fmt, used_map = table_records(path, columns, records, fmt, column_map)
    if fmt == "auto":
        fmt = detect_format(path, records)
    records, tool_rows, dropped = _set_aside(records, fmt)
    errors, good = _validate(records, fmt, tokenizer, unit)
    report = _report(path, fmt, len(records) + len(tool_rows), errors, good)
    report.file_kind, report.unit, report.columns, report.column_map = kind, unit, columns, used_map
    report.tool_rows = tool_rows
    report.notes = _notes(report, dropped)
    if json_check:
        report.json_check = check_json_replies(report.rows, report.row_numbers)
    return report


def read_records(path: str | Path) -> tuple[str, list[str] | None, list[Record]]:
    """A file's rows before any row format applies: (kind, table columns or None, records).

    The readers of `load_dataset_file`, so every file the studio reads goes through one parser
    (quoted CSV cells keep their line breaks). Each record is (line or row number, parsed value,
    parse error). Chat's prompt files, whose rows need no answer, are read through this.
    """
    path = Path(path).expanduser()
    kind = file_kind(path)
    if kind in ("csv", "parquet"):
        columns, records = read_table(path, kind)
        return kind, columns, records
    return kind, None, read_jsonl(path) if kind == "jsonl" else read_json(path)


def _set_aside(records: list[Record], fmt: str) -> tuple[list[Record], list[int], set[str]]:
    """The records to validate, the lines of rows that call tools (not supported yet: counted,
    not an error on every row) and the turn keys read but dropped (OpenAI's `name`)."""
    kept: list[Record] = []
    tool_rows: list[int] = []
    dropped: set[str] = set()
    for record in records:
        line, rec, err = record
        if err is None and tool_use(rec, fmt):
            tool_rows.append(line)
            continue
        if err is None:
            dropped |= dropped_keys(rec, fmt)
        kept.append(record)
    return kept, tool_rows, dropped


def _notes(report: DatasetReport, dropped: set[str]) -> list[str]:
    """One plain note per thing the loader read and did not train on as written."""
    notes: list[str] = []
    if report.tool_rows:
        shown = ", ".join(map(str, report.tool_rows[:10])) + (
            ", …" if len(report.tool_rows) > 10 else ""
        )
        n = len(report.tool_rows)
        notes.append(
            f"{n:,} {'row calls' if n == 1 else 'rows call'} tools (tool_calls, role 'tool' or"
            f" function_call): tool use is not supported yet, so"
            f" {'it is' if n == 1 else 'they are'} left out ({report.unit}s {shown})."
        )
    if "name" in dropped:
        notes.append(
            "Messages carry a 'name': it is ignored (chat templates do not write who speaks);"
            " the role and content are trained as usual."
        )
    unweighted = sum(m.get(WEIGHT_KEY) == 0 for row in report.rows for m in row["messages"])
    if unweighted:
        replies = "assistant reply has" if unweighted == 1 else "assistant replies have"
        notes.append(
            f"{unweighted:,} {replies} weight 0: context in the conversation, not trained."
        )
    return notes


def _validate(
    records: list[Record], fmt: str, tokenizer: Any, unit: str
) -> tuple[list[RowError], list[tuple[int, Row]]]:
    """Row errors, and the (line, row) of the rows that are usable, in file order."""
    errors: list[RowError] = []
    good: list[tuple[int, Row]] = []
    for line, rec, err in records:
        if err is not None:
            errors.append(RowError(line, "", err, unit))
            continue
        row, problems = _normalize(rec, fmt)
        if row is None:
            errors.extend(RowError(line, f, m, unit) for f, m in problems)
        else:
            good.append((line, row))
    if tokenizer is not None and good:
        rejected = _template_problems(tokenizer, good)
        if rejected:
            key = {"sharegpt": "conversations", "preference": "prompt"}.get(fmt, "messages")
            for idx in sorted(rejected):
                errors.append(RowError(good[idx][0], key, rejected[idx], unit))
            good = [g for i, g in enumerate(good) if i not in rejected]
    errors.sort(key=lambda e: e.line)
    return errors, good


def _normalize(rec: Any, fmt: str) -> tuple[Row | None, list[tuple[str, str]]]:
    """One record as a row: {"messages"} for SFT formats, prompt/chosen/rejected as well for
    preference rows (`studio.data.preference`)."""
    if fmt == "preference":
        return normalize_preference(rec)
    messages, problems = normalize_record(rec, fmt)
    return ({"messages": messages} if messages is not None else None), problems


def _conversations(row: Row) -> list[list[Message]]:
    """What the model reads of a row: its conversation, and prompt + rejected for a pair."""
    if "rejected" in row:
        return [row["messages"], row["prompt"] + row["rejected"]]
    return [row["messages"]]


def _template_problems(tokenizer: Any, items: list[tuple[int, Row]]) -> dict[int, str]:
    """Rows whose role order the model's chat template rejects, by index into items.

    Templates judge the role sequence, so one render per distinct sequence is enough; a
    rejected sequence is re-checked row by row in case the template looked at the content.
    A preference row is judged on both of its conversations.
    """
    by_pattern: dict[tuple[tuple[str, ...], ...], list[int]] = {}
    for idx, (_, row) in enumerate(items):
        key = tuple(tuple(m["role"] for m in conv) for conv in _conversations(row))
        by_pattern.setdefault(key, []).append(idx)
    rejected: dict[int, str] = {}
    for pattern, idxs in by_pattern.items():
        if _render_problem(tokenizer, items[idxs[0]][1]) is None:
            continue
        order = ", ".join(pattern[0])
        for idx in idxs:
            problem = _render_problem(tokenizer, items[idx][1])
            if problem is not None:
                rejected[idx] = f"role order ({order}) rejected: {problem}"
    return rejected


def _render_problem(tokenizer: Any, row: Row) -> str | None:
    """Why the chat template cannot render one of the row's conversations, or None."""
    for conv in _conversations(row):
        try:
            chat_format.render(tokenizer, conv)
        except chat_format.TemplateError as exc:
            return str(exc)
    return None


def _report(
    path: Path,
    fmt: str,
    total: int,
    errors: list[RowError],
    good: list[tuple[int, Row]],
) -> DatasetReport:
    """The report's figures: roles, turns per row and groups of identical rows."""
    roles: Counter[str] = Counter()
    turn_counts: Counter[int] = Counter()
    seen: dict[tuple, list[int]] = {}
    for line, row in good:
        n_turns = 0
        for m in row["messages"]:
            roles[m["role"]] += 1
            n_turns += m["role"] != "system"
        turn_counts[n_turns] += 1
        key = tuple((m["role"], m["content"]) for conv in _conversations(row) for m in conv)
        seen.setdefault(key, []).append(line)
    duplicates = [lines for lines in seen.values() if len(lines) > 1]
    del seen
    return DatasetReport(
        path=path,
        format=fmt,
        rows=[row for _, row in good],
        row_numbers=[line for line, _ in good],
        errors=errors,
        total=total,
        valid=len(good),
        invalid=len({e.line for e in errors}),
        duplicates=duplicates,
        roles={r: roles[r] for r in ROLES if roles[r]},
        turns=_turn_stats(turn_counts),
    )


def _turn_stats(counts: Counter[int]) -> dict[str, Any]:
    n = sum(counts.values())
    if not n:
        return {"min": 0, "max": 0, "mean": 0.0, "counts": {}}
    return {
        "min": min(counts),
        "max": max(counts),
        "mean": round(sum(k * v for k, v in counts.items()) / n, 2),
        "counts": dict(sorted(counts.items())),
    }


def check_json_replies(rows: list[Row], row_numbers: list[int] | None = None) -> dict[str, Any]:
    """Which rows have a trained assistant reply that does not parse as JSON (for JSON-output
    tasks); a weight-0 reply is context, which the model does not learn to write."""
    numbers = row_numbers or list(range(1, len(rows) + 1))
    failed: list[int] = []
    examples: list[dict[str, Any]] = []
    for line, row in zip(numbers, rows, strict=True):
        for m in row["messages"]:
            if m["role"] != "assistant" or m.get(WEIGHT_KEY) == 0:
                continue
            try:
                json.loads(m["content"])
            except (ValueError, RecursionError) as exc:
                failed.append(line)
                if len(examples) < 50:
                    examples.append({"line": line, "error": json_error(exc)})
                break
    return {
        "checked": len(rows),
        "passed": len(rows) - len(failed),
        "failed": len(failed),
        "failed_rows": failed,
        "examples": examples,
    }


def training_row(row: Row) -> Row:
    """A loaded row as a run keeps it: {"messages"}, plus prompt/chosen/rejected for a pair."""
    keys = ("messages", "prompt", "chosen", "rejected") if "rejected" in row else ("messages",)
    return {k: row[k] for k in keys}


class ChangedDataError(ValueError):
    """A run's split cannot be rebuilt (its data file changed, went missing or is unreadable)."""


def run_split(run: Run) -> tuple[list[Row], list[Row]]:
    """A finished run's (train, validation) rows: the seeded split training made, rebuilt.

    Rebuilt from the file and settings the run recorded, through the loader training used.
    Training recorded the file's hash; when the file changed since, the split would not be
    the one the run held out, so ChangedDataError says so rather than return other rows.
    """
    from studio.data.pii import file_sha256

    ds = run.dataset
    path = Path(ds["path"]).expanduser() if ds.get("path") else SAMPLE_DATASET
    if not path.is_file():
        raise ChangedDataError(f"{path}: the dataset {run.name} was trained on is gone")
    recorded = ds.get("sha256")
    if recorded and file_sha256(path) != recorded:
        raise ChangedDataError(
            f"{path} changed since {run.name} was trained, so its validation split cannot be"
            " rebuilt"
        )
    try:
        report = load_dataset_file(path, fmt=ds.get("format") or "auto")
    except DatasetError as exc:
        raise ChangedDataError(f"{path}: {exc}") from exc
    rows = [training_row(row) for row in report.rows]
    val_fraction = float(run.settings.get("val_fraction", DEFAULT_VAL_FRACTION))
    return split_rows(rows, val_fraction, int(run.settings.get("seed", DEFAULT_SEED)))
