"""Reading tables: CSV/TSV and Parquet files, and mapping their columns onto row fields.

A table holds either a `messages` / `conversations` column of JSON (a chat dataset stored as a
table), or columns that map onto the Alpaca fields (`instruction`, `input`, `output`,
`system`), guessed by common names or chosen by the user in the Dataset tab.

Tables come from Excel as often as from code: UTF-16 "Unicode Text" (tab-separated), CSV with
`;` between cells (European Excel) and a UTF-8 BOM all read. Every CSV the studio writes goes
through `write_csv`: UTF-8 with a BOM, the only way Excel opens Vietnamese or Thai text right.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from studio.data.normalize import ALPACA_FIELDS
from studio.data.read import (
    EXPECTED,
    MAX_LINE_BYTES,
    SNIFF_BYTES,
    DatasetError,
    Record,
    check_decodes,
    file_kind,
    open_utf8,
)

_COLUMN_GUESSES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "prompt", "question", "query", "user", "human", "request"),
    "input": ("input", "context", "additional_input", "input_text"),
    "output": ("output", "response", "answer", "completion", "assistant", "gpt", "reply"),
    "system": ("system", "system_prompt", "system_message"),
}
# The line ends the csv module knows; a quoted cell may hold U+2028 and the like.
_LINE_END = re.compile(r"\r\n|\r|\n")


def read_table(path: Path, kind: str) -> tuple[list[str], list[Record]]:
    """Columns and rows (dicts) of a CSV or Parquet file, with line/row numbers."""
    if kind == "parquet":
        return _read_parquet(path)
    check_decodes(path)
    with io.TextIOWrapper(open_utf8(path), encoding="utf-8-sig", newline="") as f:
        sample = f.read(SNIFF_BYTES)
        f.seek(0)
        header_line = _LINE_END.split(sample, 1)[0]
        delim = _delimiter(path, header_line)
        csv.field_size_limit(MAX_LINE_BYTES)
        reader = csv.reader(f, delimiter=delim)
        try:
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise DatasetError(f"{path.name} has no header row. {EXPECTED}")
            columns = [h.strip() for h in header]
            records: list[Record] = []
            start = reader.line_num + 1
            for values in reader:
                line_no = start
                start = reader.line_num + 1
                if not any(v.strip() for v in values):
                    continue
                if len(values) != len(columns):
                    err = f"has {len(values)} fields but the header has {len(columns)} columns"
                    records.append((line_no, None, err))
                    continue
                records.append((line_no, dict(zip(columns, values, strict=True)), None))
        except csv.Error as exc:
            raise DatasetError(
                f"{path.name} is not a readable CSV file: line {reader.line_num}: {exc}."
            ) from None
    if not records:
        raise DatasetError(f"{path.name} has a header but no rows. {EXPECTED}")
    return columns, records


def _delimiter(path: Path, header_line: str) -> str:
    """Tab for .tsv; otherwise whichever of , ; tab the header uses most."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    return max(",;\t", key=header_line.count)


def _read_parquet(path: Path) -> tuple[list[str], list[Record]]:
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        columns = list(pf.schema_arrow.names)
        records: list[Record] = []
        n = 0
        for batch in pf.iter_batches(batch_size=10_000):
            for item in batch.to_pylist():
                n += 1
                records.append((n, item, None))
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"{path.name} is not a readable Parquet file: {exc}") from None
    if not records:
        raise DatasetError(f"{path.name} has no rows. {EXPECTED}")
    return columns, records


def table_columns(path: str | Path) -> list[str] | None:
    """The columns of a CSV/Parquet file (for the column-mapping controls); None otherwise."""
    path = Path(path).expanduser()
    kind = file_kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.ParquetFile(path).schema_arrow.names)
        except Exception as exc:
            raise DatasetError(f"{path.name} is not a readable Parquet file: {exc}") from None
    if kind == "csv":
        text = io.TextIOWrapper(open_utf8(path), encoding="utf-8-sig", errors="replace")
        with text as f:
            header_line = f.readline()
        delim = _delimiter(path, header_line)
        return [h.strip() for h in next(csv.reader([header_line], delimiter=delim), [])]
    return None


def guess_column_map(columns: Iterable[str]) -> dict[str, str | None]:
    """Guess which table column holds each Alpaca field, by common names."""
    by_lower = {c.strip().lower(): c for c in columns}
    guess: dict[str, str | None] = {}
    used: set[str] = set()
    for fld in ALPACA_FIELDS:
        guess[fld] = None
        for name in _COLUMN_GUESSES[fld]:
            col = by_lower.get(name)
            if col is not None and col not in used:
                guess[fld] = col
                used.add(col)
                break
    # (input, output) tables mean the input is the instruction.
    if guess["instruction"] is None and guess["input"] is not None:
        guess["instruction"], guess["input"] = guess["input"], None
    return guess


def table_records(
    path: Path,
    columns: list[str],
    records: list[Record],
    fmt: str,
    column_map: dict[str, str | None] | None,
) -> tuple[list[Record], str, dict[str, str | None] | None]:
    """Turn table rows into format records: a messages/conversations column, or Alpaca fields."""
    lower = {c.lower(): c for c in columns}
    for chat_fmt, col_name in (("messages", "messages"), ("sharegpt", "conversations")):
        col = lower.get(col_name)
        if col is not None and (fmt == chat_fmt or (fmt == "auto" and not column_map)):
            out: list[Record] = []
            for line, item, err in records:
                if err is not None:
                    out.append((line, None, err))
                    continue
                value = item.get(col)
                if isinstance(value, str):
                    try:
                        value = json.loads(value)
                    except (ValueError, RecursionError) as exc:
                        why = exc if isinstance(exc, ValueError) else "nested too deeply"
                        out.append((line, None, f"column '{col}' is not valid JSON: {why}"))
                        continue
                out.append((line, {col_name: value}, None))
            return out, chat_fmt, None
    if fmt in ("messages", "sharegpt"):
        want = "messages" if fmt == "messages" else "conversations"
        raise DatasetError(
            f"{path.name} has no '{want}' column for the {fmt} format (columns: "
            f"{', '.join(columns)}). Pick the Alpaca format and map the columns instead."
        )
    mapping = {k: v for k, v in (column_map or guess_column_map(columns)).items() if v}
    missing_cols = [v for v in mapping.values() if v not in columns]
    if missing_cols:
        raise DatasetError(
            f"{path.name} has no column {missing_cols[0]!r} (columns: {', '.join(columns)})."
        )
    for need in ("instruction", "output"):
        if not mapping.get(need):
            raise DatasetError(
                f"Choose the column that holds the {need} (columns of {path.name}: "
                f"{', '.join(columns)}). Alpaca needs an instruction and an output column."
            )
    out = []
    for line, item, err in records:
        if err is not None:
            out.append((line, None, err))
            continue
        out.append((line, {fld: item.get(col) for fld, col in mapping.items()}, None))
    return out, "alpaca", {fld: mapping.get(fld) for fld in ALPACA_FIELDS}


# What Excel needs to read a CSV as UTF-8 rather than the system's code page: the BOM.
CSV_ENCODING = "utf-8-sig"


def write_csv(path: str | Path, columns: list[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as a new CSV file that Excel opens right (UTF-8 with BOM); never overwrites.

    Values of keys not in `columns` are left out; a missing key writes an empty cell.
    """
    path = Path(path)
    with path.open("x", encoding=CSV_ENCODING, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
