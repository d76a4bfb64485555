"""Load, validate and normalize a fine-tuning dataset into chat messages, the form training uses.

Files: `.jsonl`, `.json` (an array of rows, or an object holding one), `.csv`/`.tsv` and
`.parquet`; UTF-8 with or without BOM, LF or CRLF. Row formats, detected or chosen:
Alpaca (`instruction`, `input`, `output`, optional `system`), ShareGPT
(`conversations: [{from, value}]`) and chat messages (`messages: [{role, content}]`). Table
columns (CSV/Parquet) are mapped onto the Alpaca fields.

Every row becomes `{"messages": [{"role", "content"}, ...]}`. A bad row is reported with the
file's line (or row) number and left out; the good rows stay usable. A file that is not a
dataset at all raises one `DatasetError` saying what was expected.

Also here: the train/validation split, token-length statistics with the base model's own
tokenizer, the chat-template preview of one row, and the token-length histogram.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.data import chat_format

Message = dict[str, str]
Row = dict[str, list[Message]]

SAMPLE_DATASET = Path(__file__).resolve().parent / "sample_data" / "support_tickets.jsonl"

FORMATS = ("messages", "sharegpt", "alpaca")
FORMAT_CHOICES = ("auto", *FORMATS)
ALPACA_FIELDS = ("instruction", "input", "output", "system")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# Spellings seen in ShareGPT-style files in the wild; they mean the same roles.
_SHAREGPT_ALIASES = {"user": "user", "assistant": "assistant"}
# Row keys that carry bookkeeping, not training text: tolerated and ignored.
META_KEYS = frozenset({"id", "source", "meta", "metadata", "lang", "language", "tags", "split"})

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SEED = 42
DEFAULT_MAX_LEN = 512
# One row longer than this is not a chat example; stop before reading gigabytes as one line.
MAX_LINE_BYTES = 8 * 1024 * 1024
# A .json file is parsed whole; past this size ask for .jsonl, which streams.
MAX_JSON_BYTES = 1024 * 1024 * 1024
_SNIFF_BYTES = 64 * 1024
_EXPECTED = (
    "Expected a fine-tuning dataset: .jsonl (one JSON object per line), .json (an array of rows),"
    " .csv or .parquet, in UTF-8, with rows in chat 'messages', ShareGPT 'conversations' or"
    " Alpaca 'instruction'/'output' form."
)
_COLUMN_GUESSES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "prompt", "question", "query", "user", "human", "request"),
    "input": ("input", "context", "additional_input", "input_text"),
    "output": ("output", "response", "answer", "completion", "assistant", "gpt", "reply"),
    "system": ("system", "system_prompt", "system_message"),
}


class DatasetError(ValueError):
    """The file is not a usable dataset; the message says what was expected and what to do."""


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
            "duplicate_groups": len(self.duplicates),
            "duplicate_rows": self.duplicate_rows,
            "roles": dict(self.roles),
            "turns": self.turns,
            "train_rows": n_train,
            "val_rows": n_val,
            "seed": DEFAULT_SEED,
        }


# --------------------------------------------------------------------------- file reading


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
    kind = _file_kind(path)
    columns: list[str] | None = None
    used_map: dict[str, str | None] | None = None
    if kind in ("csv", "parquet"):
        columns, records = _read_table(path, kind)
        records, fmt, used_map = _table_records(path, columns, records, fmt, column_map)
        unit = "row" if kind == "parquet" else "line"
    else:
        records = _read_jsonl(path) if kind == "jsonl" else _read_json(path)
        unit = "line"
    return _build_report(path, kind, unit, records, fmt, tokenizer, json_check, columns, used_map)


def _file_kind(path: Path) -> str:
    """Decide how to read the file from its first bytes (and its name), or explain why not."""
    if not path.exists():
        raise DatasetError(f"{path} does not exist. Check the path, or upload the file.")
    if path.is_dir():
        raise DatasetError(f"{path} is a folder. Pick one dataset file inside it.")
    try:
        with path.open("rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as exc:
        raise DatasetError(f"{path} cannot be read: {exc.strerror or exc}.") from exc
    name = path.name
    ext = path.suffix.lower()
    if not head.strip(b" \t\r\n\xef\xbb\xbf"):
        raise DatasetError(f"{name} is empty. {_EXPECTED}")
    if head.startswith(b"PAR1"):
        return "parquet"
    if ext == ".parquet":
        raise DatasetError(f"{name} is named .parquet but is not a Parquet file. {_EXPECTED}")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DatasetError(f"{name} is UTF-16 text. Save it as UTF-8 and load it again.")
    if head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf")):
        raise DatasetError(f"{name} is a compressed archive. Unpack it first. {_EXPECTED}")
    if b"\x00" in head:
        raise DatasetError(f"{name} is a binary file, not text. {_EXPECTED}")
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    first = text[:1]
    if ext in (".csv", ".tsv"):
        return "csv"
    if first == b"[":
        return "json"
    if first == b"{":
        if ext == ".jsonl" or ext == ".ndjson":
            return "jsonl"
        return "jsonl" if _looks_like_jsonl(text) else "json"
    if ext in (".json", ".jsonl", ".ndjson"):
        _check_decodes(path)
        snippet = text[:60].decode("utf-8", "replace").splitlines()[0]
        raise DatasetError(
            f"{name} is not JSON: it starts with {snippet!r} where a JSON object '{{' or array"
            f" '[' was expected. {_EXPECTED}"
        )
    raise DatasetError(f"{name}: unsupported file type '{ext or '(none)'}'. {_EXPECTED}")


def _looks_like_jsonl(text: bytes) -> bool:
    """A first line that is a complete JSON value followed by more lines means JSON Lines."""
    first, _, rest = text.partition(b"\n")
    if not rest.strip():
        return False
    try:
        json.loads(first)
    except ValueError:
        return False
    return True


def _check_decodes(path: Path) -> None:
    """Raise one clear message for text that is not UTF-8, naming the line."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(_read_lines(f, path), start=1):
            _decode(raw, path, line_no)


def _read_lines(f: io.BufferedReader, path: Path) -> Iterator[bytes]:
    """Lines of a binary file, refusing a line too long to be one dataset row."""
    line_no = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) > MAX_LINE_BYTES:
            raise DatasetError(
                f"{path.name}: line {line_no} is longer than {MAX_LINE_BYTES // 2**20} MB, far"
                f" more than one training example. {_EXPECTED}"
            )
        yield raw


def _decode(raw: bytes, path: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex()
        raise DatasetError(
            f"{path.name} is not UTF-8 text: line {line_no} has the byte 0x{bad} at position"
            f" {exc.start + 1}. Save the file as UTF-8 and load it again."
        ) from None


Record = tuple[int, Any, str | None]  # (line/row number, parsed value, parse error)


def _read_jsonl(path: Path) -> list[Record]:
    """Each non-blank line parsed as JSON; a line that is not JSON becomes a row error."""
    records: list[Record] = []
    loads = json.loads
    with path.open("rb") as f:
        for line_no, raw in enumerate(_read_lines(f, path), start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            text = _decode(raw, path, line_no)
            if not text.strip():
                continue
            try:
                records.append((line_no, loads(text), None))
            except ValueError as exc:
                msg = getattr(exc, "msg", str(exc))
                col = getattr(exc, "colno", None)
                at = f" at column {col}" if col else ""
                records.append((line_no, None, f"invalid JSON{at}: {msg}"))
    if records and all(err is not None for _, _, err in records):
        line_no, _, err = records[0]
        raise DatasetError(f"{path.name} has no JSON rows: line {line_no} is {err}. {_EXPECTED}")
    return records


_WS = re.compile(r"[ \t\n\r]*")


def _read_json(path: Path) -> list[Record]:
    """A JSON array of rows, or an object holding such an array; rows keep their line numbers."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise DatasetError(
            f"{path.name} is larger than 1 GB; save it as .jsonl (one row per line) instead."
        )
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = raw.count(b"\n", 0, exc.start) + 1
        raise DatasetError(
            f"{path.name} is not UTF-8 text: line {line_no} has the byte"
            f" 0x{raw[exc.start : exc.start + 1].hex()}. Save the file as UTF-8 and load it again."
        ) from None
    del raw
    pos = _WS.match(text).end()
    try:
        if text.startswith("[", pos):
            records, end = _parse_json_array(text, pos)
        else:
            records, end = _records_from_object(text, pos)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path.name} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
            " A .json dataset is one array of rows (or an object holding one); for one row per"
            " line use .jsonl."
        ) from None
    end = _WS.match(text, end).end()
    if end < len(text):
        line_no = text.count("\n", 0, end) + 1
        raise DatasetError(
            f"{path.name} is not valid JSON: extra data after the rows at line {line_no}."
        )
    if not records:
        raise DatasetError(f"{path.name} holds an empty list: there are no rows. {_EXPECTED}")
    return records


def _parse_json_array(text: str, pos: int) -> tuple[list[Record], int]:
    """Items of the JSON array at text[pos], each with the line it starts on; and its end."""
    decode = json.JSONDecoder().raw_decode
    records: list[Record] = []
    line, last = text.count("\n", 0, pos) + 1, pos
    pos = _WS.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return records, pos + 1
    while True:
        line += text.count("\n", last, pos)
        last = pos
        value, end = decode(text, pos)
        records.append((line, value, None))
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return records, pos + 1
        else:
            raise json.JSONDecodeError("Expecting ',' or ']' after a row", text, pos)


def _records_from_object(text: str, pos: int) -> tuple[list[Record], int]:
    """An object that is one row, or that holds the rows in one of its list values."""
    decode = json.JSONDecoder().raw_decode
    if not text.startswith("{", pos):
        raise json.JSONDecodeError("Expecting '[' or '{'", text, pos)
    whole, end = decode(text, pos)
    if _guess_record_format(whole):
        return [(text.count("\n", 0, pos) + 1, whole, None)], end
    lists = [k for k, v in whole.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if not lists:
        keys = ", ".join(list(whole)[:10]) or "(none)"
        raise DatasetError(f"The JSON object holds no list of rows (its keys: {keys}). {_EXPECTED}")
    sizes = {k: len(whole[k]) for k in lists}
    key = max(lists, key=sizes.__getitem__)
    del whole
    # The document is valid JSON by now: walk its members again to find where the chosen
    # list starts, so its rows get line numbers.
    p = _WS.match(text, pos + 1).end()
    while True:
        name, p = decode(text, p)
        p = _WS.match(text, _WS.match(text, p).end() + 1).end()  # past the ':'
        if name == key:
            return _parse_json_array(text, p)[0], end
        _, p = decode(text, p)
        p = _WS.match(text, _WS.match(text, p).end() + 1).end()  # past the ','


def _read_table(path: Path, kind: str) -> tuple[list[str], list[Record]]:
    """Columns and rows (dicts) of a CSV or Parquet file, with line/row numbers."""
    if kind == "parquet":
        return _read_parquet(path)
    _check_decodes(path)
    with path.open("r", encoding="utf-8-sig", newline="") as f:
        sample = f.read(_SNIFF_BYTES)
        f.seek(0)
        header_line = sample.splitlines()[0] if sample else ""
        delim = _delimiter(path, header_line)
        csv.field_size_limit(MAX_LINE_BYTES)
        reader = csv.reader(f, delimiter=delim)
        try:
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise DatasetError(f"{path.name} has no header row. {_EXPECTED}")
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
        raise DatasetError(f"{path.name} has a header but no rows. {_EXPECTED}")
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
        raise DatasetError(f"{path.name} has no rows. {_EXPECTED}")
    return columns, records


def table_columns(path: str | Path) -> list[str] | None:
    """The columns of a CSV/Parquet file (for the column-mapping controls); None otherwise."""
    path = Path(path).expanduser()
    kind = _file_kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return list(pq.ParquetFile(path).schema_arrow.names)
        except Exception as exc:
            raise DatasetError(f"{path.name} is not a readable Parquet file: {exc}") from None
    if kind == "csv":
        with path.open("r", encoding="utf-8-sig", newline="", errors="replace") as f:
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


def _table_records(
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
                    except ValueError as exc:
                        out.append((line, None, f"column '{col}' is not valid JSON: {exc}"))
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


# --------------------------------------------------------------------------- validation


def _guess_record_format(rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    return None


def _detect_format(path: Path, records: list[Record]) -> str:
    """The format most of the first 500 parsed rows have."""
    parsed = []
    for _, rec, err in records:
        if err is None:
            parsed.append(rec)
            if len(parsed) == 500:
                break
    votes = Counter(f for rec in parsed if (f := _guess_record_format(rec)))
    if votes:
        return votes.most_common(1)[0][0]
    keys: Counter[str] = Counter()
    for rec in parsed:
        if isinstance(rec, dict):
            keys.update(rec.keys())
    found = ", ".join(k for k, _ in keys.most_common(8)) or "no JSON objects"
    raise DatasetError(
        f"{path.name}: no recognizable dataset format (rows have keys: {found}). Expected"
        " 'messages' (chat), 'conversations' (ShareGPT) or 'instruction' + 'output' (Alpaca)."
    )


def _normalize(rec: Any, fmt: str) -> tuple[list[Message] | None, list[tuple[str, str]]]:
    """One record as chat messages, or the (field, reason) problems that make it unusable."""
    if not isinstance(rec, dict):
        return None, [("", f"expected a JSON object, got {_json_type(rec)}")]
    if fmt == "alpaca":
        return _normalize_alpaca(rec)
    key, role_key, text_key = (
        ("messages", "role", "content") if fmt == "messages" else ("conversations", "from", "value")
    )
    problems: list[tuple[str, str]] = []
    allowed = {key} | META_KEYS
    problems += [
        (k, f"unknown key '{k}' (a {fmt} row holds '{key}')") for k in rec if k not in allowed
    ]
    turns = rec.get(key)
    if key not in rec:
        hint = _format_hint(rec)
        return None, [*problems, (key, f"missing key '{key}'{hint}")]
    if not isinstance(turns, list) or not turns:
        return None, [*problems, (key, f"must be a non-empty list, got {_json_type(turns)}")]
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            problems.append((where, f"expected an object, got {_json_type(turn)}"))
            continue
        extra = [k for k in turn if k not in (role_key, text_key)]
        problems += [(where, f"unknown key '{k}' (expected {role_key}, {text_key})") for k in extra]
        if role_key not in turn:
            problems.append((where, f"missing key '{role_key}'"))
            continue
        raw_role = turn[role_key]
        if fmt == "messages":
            role = raw_role if raw_role in ROLES else None
            expected = "system, user or assistant"
        else:
            role = SHAREGPT_ROLES.get(raw_role) or _SHAREGPT_ALIASES.get(raw_role)
            expected = "human, gpt or system"
        if role is None:
            problems.append(
                (f"{where}.{role_key}", f"unknown role {raw_role!r} (expected {expected})")
            )
            continue
        if text_key not in turn:
            problems.append((where, f"missing key '{text_key}'"))
            continue
        content = turn[text_key]
        if not isinstance(content, str):
            if content is None:
                problems.append((f"{where}.{text_key}", f"empty content in the {role} turn"))
            else:
                problems.append(
                    (f"{where}.{text_key}", f"content must be text, got {_json_type(content)}")
                )
            continue
        if not content.strip():
            problems.append((f"{where}.{text_key}", f"empty content in the {role} turn"))
            continue
        messages.append({"role": role, "content": content})
    if problems:
        return None, problems
    return _check_turns(messages, key)


def _normalize_alpaca(rec: dict[str, Any]) -> tuple[list[Message] | None, list[tuple[str, str]]]:
    problems: list[tuple[str, str]] = []
    allowed = set(ALPACA_FIELDS) | META_KEYS
    problems += [
        (k, f"unknown key '{k}' (an Alpaca row holds instruction, input, output, system)")
        for k in rec
        if k not in allowed
    ]
    values: dict[str, str] = {}
    for fld in ALPACA_FIELDS:
        value = rec.get(fld)
        if fld in ("instruction", "output") and fld not in rec:
            problems.append((fld, f"missing key '{fld}'{_format_hint(rec)}"))
            continue
        if value is None:
            value = ""
        if not isinstance(value, str):
            problems.append((fld, f"must be text, got {_json_type(value)}"))
            continue
        if fld in ("instruction", "output") and not value.strip():
            problems.append((fld, f"empty content in '{fld}'"))
            continue
        values[fld] = value
    if problems:
        return None, problems
    messages: list[Message] = []
    if values.get("system", "").strip():
        messages.append({"role": "system", "content": values["system"]})
    user = values["instruction"]
    if values.get("input", "").strip():
        user = f"{user}\n\n{values['input']}"
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": values["output"]})
    return messages, []


def _check_turns(
    messages: list[Message], key: str
) -> tuple[list[Message] | None, list[tuple[str, str]]]:
    roles = {m["role"] for m in messages}
    problems = []
    if "user" not in roles:
        problems.append((key, "no user turn"))
    if "assistant" not in roles:
        problems.append((key, "no assistant turn (nothing to train on)"))
    return (None, problems) if problems else (messages, [])


def _format_hint(rec: dict[str, Any]) -> str:
    other = _guess_record_format(rec)
    if other:
        return f" (this row looks like the {other} format)"
    keys = ", ".join(list(rec)[:6]) or "none"
    return f" (row keys: {keys})"


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "text",
        bool: "true/false",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _template_problems(tokenizer: Any, items: list[tuple[int, list[Message]]]) -> dict[int, str]:
    """Rows whose role order the model's chat template rejects, by index into items.

    Templates judge the role sequence, so one render per distinct sequence is enough; a
    rejected sequence is re-checked row by row in case the template looked at the content.
    """
    by_pattern: dict[tuple[str, ...], list[int]] = {}
    for idx, (_, msgs) in enumerate(items):
        by_pattern.setdefault(tuple(m["role"] for m in msgs), []).append(idx)
    rejected: dict[int, str] = {}
    for pattern, idxs in by_pattern.items():
        try:
            chat_format.render(tokenizer, items[idxs[0]][1])
            continue
        except chat_format.TemplateError:
            pass
        order = ", ".join(pattern)
        for idx in idxs:
            try:
                chat_format.render(tokenizer, items[idx][1])
            except chat_format.TemplateError as exc:
                rejected[idx] = f"role order ({order}) rejected: {exc}"
    return rejected


def _build_report(
    path: Path,
    kind: str,
    unit: str,
    records: list[Record],
    fmt: str,
    tokenizer: Any,
    json_check: bool,
    columns: list[str] | None,
    column_map: dict[str, str | None] | None,
) -> DatasetReport:
    if fmt == "auto":
        fmt = _detect_format(path, records)
    errors: list[RowError] = []
    good: list[tuple[int, list[Message]]] = []
    for line, rec, err in records:
        if err is not None:
            errors.append(RowError(line, "", err, unit))
            continue
        messages, problems = _normalize(rec, fmt)
        if messages is None:
            errors.extend(RowError(line, f, m, unit) for f, m in problems)
        else:
            good.append((line, messages))
    if tokenizer is not None and good:
        rejected = _template_problems(tokenizer, good)
        if rejected:
            key = "conversations" if fmt == "sharegpt" else "messages"
            for idx in sorted(rejected):
                errors.append(RowError(good[idx][0], key, rejected[idx], unit))
            good = [g for i, g in enumerate(good) if i not in rejected]
    errors.sort(key=lambda e: e.line)
    rows: list[Row] = [{"messages": m} for _, m in good]
    row_numbers = [line for line, _ in good]
    roles: Counter[str] = Counter()
    turn_counts: Counter[int] = Counter()
    seen: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for line, msgs in good:
        n_turns = 0
        for m in msgs:
            roles[m["role"]] += 1
            n_turns += m["role"] != "system"
        turn_counts[n_turns] += 1
        seen.setdefault(tuple((m["role"], m["content"]) for m in msgs), []).append(line)
    duplicates = [lines for lines in seen.values() if len(lines) > 1]
    del seen
    total = len(records)
    invalid = len({e.line for e in errors})
    report = DatasetReport(
        path=path,
        format=fmt,
        rows=rows,
        row_numbers=row_numbers,
        errors=errors,
        total=total,
        valid=len(rows),
        invalid=invalid,
        duplicates=duplicates,
        roles={r: roles[r] for r in ROLES if roles[r]},
        turns=_turn_stats(turn_counts),
        file_kind=kind,
        unit=unit,
        columns=columns,
        column_map=column_map,
    )
    if json_check:
        report.json_check = check_json_replies(rows, row_numbers)
    return report


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
    """Which rows have an assistant reply that does not parse as JSON (for JSON-output tasks)."""
    numbers = row_numbers or list(range(1, len(rows) + 1))
    failed: list[int] = []
    examples: list[dict[str, Any]] = []
    for line, row in zip(numbers, rows, strict=True):
        for m in row["messages"]:
            if m["role"] != "assistant":
                continue
            try:
                json.loads(m["content"])
            except ValueError as exc:
                failed.append(line)
                if len(examples) < 50:
                    examples.append({"line": line, "error": getattr(exc, "msg", str(exc))})
                break
    return {
        "checked": len(rows),
        "passed": len(rows) - len(failed),
        "failed": len(failed),
        "failed_rows": failed,
        "examples": examples,
    }


# --------------------------------------------------------------------------- split


def split_sizes(n: int, val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[int, int]:
    """(train, validation) sizes for n rows: at least one validation row when there are 2+."""
    if n < 2 or val_fraction <= 0:
        return n, 0
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return n - n_val, n_val


def split_rows(
    rows: list[Any], val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = DEFAULT_SEED
) -> tuple[list[Any], list[Any]]:
    """Shuffle with a fixed seed and hold out a validation share; same input, same split."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    _, n_val = split_sizes(len(rows), val_fraction)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in val_idx]
    val = [rows[i] for i in sorted(val_idx)]
    return train, val


def write_normalized(rows: list[Row], dest: str | Path) -> Path:
    """Write rows as chat-messages JSONL (UTF-8); refuses to overwrite an existing file."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with dest.open("x", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps({"messages": row["messages"]}, ensure_ascii=False))
            f.write("\n")
    return dest


def search_rows(
    rows: list[Row],
    row_numbers: list[int],
    query: str = "",
    page: int = 1,
    page_size: int = 20,
    max_chars: int = 400,
) -> dict[str, Any]:
    """One page of the rows whose text contains `query` (any case) or whose line is `query`.

    Returns plain records (line, turns, system, user, assistant) for a table, texts cut to
    `max_chars`, plus the number of matches and pages.
    """
    q = (query or "").strip().casefold()
    if q:
        line_q = int(q) if q.isdigit() else None
        hits = [
            i
            for i, row in enumerate(rows)
            if row_numbers[i] == line_q
            or any(q in m["content"].casefold() for m in row["messages"])
        ]
    else:
        hits = list(range(len(rows)))
    pages = max(1, -(-len(hits) // page_size))
    page = max(1, min(int(page or 1), pages))

    def cut(texts: list[str]) -> str:
        text = "\n---\n".join(texts)
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    items = []
    for i in hits[(page - 1) * page_size : page * page_size]:
        msgs = rows[i]["messages"]
        items.append(
            {
                "line": row_numbers[i],
                "turns": sum(m["role"] != "system" for m in msgs),
                "system": cut([m["content"] for m in msgs if m["role"] == "system"]),
                "user": cut([m["content"] for m in msgs if m["role"] == "user"]),
                "assistant": cut([m["content"] for m in msgs if m["role"] == "assistant"]),
            }
        )
    return {"items": items, "matches": len(hits), "page": page, "pages": pages}


def store_upload(src: str | Path) -> Path:
    """Keep an uploaded file under datasets_dir()/uploads, so training can read it later.

    The copy lives in a folder named by its content hash: uploading the same file twice reuses
    it, and a different file never replaces an earlier one.
    """
    import hashlib
    import shutil

    from studio import paths

    src = Path(src)
    h = hashlib.sha256()
    with src.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    dest = paths.datasets_dir() / "uploads" / h.hexdigest()[:16] / src.name
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        shutil.copyfile(src, tmp)
        tmp.replace(dest)
    return dest


# --------------------------------------------------------------------------- tokens


def _backend(tokenizer: Any) -> Any | None:
    """The Rust `tokenizers.Tokenizer` behind a fast tokenizer, if there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    return backend if hasattr(backend, "encode_batch_fast") else None


def _lengths_direct(tokenizer: Any, texts: list[str]) -> list[int]:
    backend = _backend(tokenizer)
    out: list[int] = []
    for i in range(0, len(texts), 4096):
        chunk = texts[i : i + 4096]
        if backend is not None:
            out.extend(len(e) for e in backend.encode_batch_fast(chunk, add_special_tokens=False))
        else:
            out.extend(len(ids) for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return out


def _lengths_by_segment(tokenizer: Any, texts: list[str]) -> list[int] | None:
    """Token counts that tokenize each distinct piece between special tokens only once.

    A fast tokenizer cuts its input at its added tokens before anything else, so the
    pieces between them are tokenized independently; template boilerplate and repeated system
    prompts then cost nothing. Checked against whole-text counts on a sample: if the tokenizer
    does not behave this way (None), the caller counts whole texts.
    """
    backend = _backend(tokenizer)
    if backend is None:
        return None
    specials = sorted(
        {t.content for t in backend.get_added_tokens_decoder().values() if t.content},
        key=len,
        reverse=True,
    )
    if not specials:
        return None
    splitter = re.compile("|".join(re.escape(s) for s in specials))
    piece_ids: dict[str, int] = {}
    per_text: list[tuple[int, list[int]]] = []
    for text in texts:
        n_special = 0
        ids: list[int] = []
        last = 0
        for m in splitter.finditer(text):
            if m.start() > last:
                ids.append(piece_ids.setdefault(text[last : m.start()], len(piece_ids)))
            n_special += 1
            last = m.end()
        if last < len(text):
            ids.append(piece_ids.setdefault(text[last:], len(piece_ids)))
        per_text.append((n_special, ids))
    pieces = list(piece_ids)
    del piece_ids
    counts = _lengths_direct(tokenizer, pieces)
    lengths = [n + sum(counts[i] for i in ids) for n, ids in per_text]
    sample = list(range(0, len(texts), max(1, len(texts) // 64)))[:64]
    exact = _lengths_direct(tokenizer, [texts[i] for i in sample])
    if any(lengths[i] != e for i, e in zip(sample, exact, strict=True)):
        return None
    return lengths


def token_lengths(rows: list[Row], tokenizer: Any) -> list[int]:
    """Tokens per row as training sees them (chat_format.tokenize_conversation, untruncated)."""
    texts: list[str] = []
    extra: list[int] = []
    eos = tokenizer.eos_token
    for row in rows:
        msgs = row["messages"]
        text = chat_format.render(tokenizer, msgs)
        texts.append(text)
        # tokenize_conversation appends EOS when the template leaves the reply unterminated.
        last = msgs[-1]
        extra.append(
            int(bool(eos) and last["role"] == "assistant" and text.endswith(last["content"]))
        )
    lengths = _lengths_by_segment(tokenizer, texts)
    if lengths is None:
        lengths = _lengths_direct(tokenizer, texts)
    return [n + e for n, e in zip(lengths, extra, strict=True)]


def token_stats(rows: list[Row], tokenizer: Any, max_len: int = DEFAULT_MAX_LEN) -> dict[str, Any]:
    """Token-length figures of the rows with the model's own template and tokenizer."""
    return length_stats(token_lengths(rows, tokenizer), max_len)


def length_stats(lengths: list[int], max_len: int = DEFAULT_MAX_LEN) -> dict[str, Any]:
    """p50/p95/max and the rows over max_len, from measured lengths (a new max_len is free)."""
    ordered = sorted(lengths)
    over = [i for i, n in enumerate(lengths) if n > max_len]
    return {
        "rows": len(lengths),
        "p50": _percentile(ordered, 50),
        "p95": _percentile(ordered, 95),
        "max": ordered[-1] if ordered else 0,
        "mean": round(statistics.fmean(lengths), 1) if lengths else 0.0,
        "max_len": max_len,
        "over_max_len": len(over),
        "over_rows": over,  # indices into rows
        "lengths": lengths,
        "total_tokens": sum(lengths),
    }


def _percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile: a length that some row really has."""
    if not ordered:
        return 0
    k = max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))
    return ordered[int(k)]


def preview_row(
    row: Row | list[Message], tokenizer: Any, max_len: int | None = DEFAULT_MAX_LEN
) -> list[tuple[str, bool]]:
    """The exact training text of one row as (text, trained) segments.

    Built from chat_format.tokenize_conversation: a character is "trained" when a token that
    counts toward the loss covers it, so each assistant reply and its end-of-turn token show
    as trained. Text past max_len tokens (cut by truncation) is left out.
    """
    messages = row["messages"] if isinstance(row, dict) else row
    tc = chat_format.tokenize_conversation(tokenizer, messages, max_len)
    text = tc.text
    # The same call tokenize_conversation makes, so token i here is token i there.
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    kept = min(len(tc.input_ids), len(offsets))
    flags = [False] * len(text)
    for i in range(kept):
        if tc.assistant_mask[i]:
            a, b = offsets[i]
            flags[a:b] = [True] * (b - a)
    end_char = len(text) if kept == len(offsets) else max(b for _, b in offsets[:kept])
    segments: list[tuple[str, bool]] = []
    start = 0
    for c in range(1, end_char + 1):
        if c == end_char or flags[c] != flags[start]:
            segments.append((text[start:c], flags[start]))
            start = c
    for i in range(len(offsets), len(tc.input_ids)):  # appended after the text (EOS)
        token = tokenizer.convert_ids_to_tokens(tc.input_ids[i])
        segments.append((token, bool(tc.assistant_mask[i])))
    return segments


def length_histogram(stats: dict[str, Any]) -> Any:
    """A plotly histogram of token lengths with the max-length cut marked."""
    import plotly.graph_objects as go

    lengths = stats.get("lengths") or []
    max_len = stats.get("max_len")
    fig = go.Figure(
        go.Histogram(x=lengths, nbinsx=min(60, max(10, len(lengths) // 5)), name="rows")
    )
    if max_len:
        fig.add_vline(
            x=max_len,
            line_dash="dash",
            line_color="crimson",
            annotation_text=f"max length {max_len}",
            annotation_position="top right",
        )
    fig.update_layout(
        title="Tokens per row (chat template applied)",
        xaxis_title="tokens",
        yaxis_title="rows",
        bargap=0.05,
        template="plotly_white",
        height=320,
        margin={"l": 40, "r": 20, "t": 50, "b": 40},
        showlegend=False,
    )
    return fig
