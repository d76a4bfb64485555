"""Reading a dataset file into records: what kind of file it is, and its JSON rows.

A file's kind is decided from its first bytes (and its name): JSON Lines, one JSON document,
CSV/TSV or Parquet (the tables are read in `table.py`). A record is `(line, value, error)`: the
line (or table row) it came from, the parsed value, or why that line did not parse. A file that
is not a dataset at all raises one `DatasetError` saying what was expected.

JSON Lines are split at "\n" only: text written with `ensure_ascii=False` may hold U+2028,
U+0085 and other characters that `str.splitlines()` would wrongly treat as line ends.

Encodings: UTF-8 (with or without BOM), and UTF-16/UTF-32 with a BOM (Excel's "Unicode Text"
and "CSV UTF-16"), which is decoded once in memory (`open_utf8`). Text in a legacy code page
(Windows-1252, Windows-1258 Vietnamese...) is refused with a message naming the code page it
looks like and how to save it as UTF-8: every byte is some letter in every code page, so a
wrong guess reads without error into wrong letters, a silent misread; and training reads the
file again later by its path, so one re-save fixes it for the studio and every other tool.

Also here: the row format most records have, and keeping an uploaded file for later runs.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from studio import compat
from studio.data.normalize import guess_record_format

# One row longer than this is not a chat example; stop before reading gigabytes as one line.
MAX_LINE_BYTES = 8 * 1024 * 1024
# A .json file is parsed whole (the text, then its rows: a few times its size in memory);
# from this size on ask for .jsonl, which streams.
MAX_JSON_BYTES = 512 * 1024 * 1024
SNIFF_BYTES = 64 * 1024
# UTF-16/32 text is decoded whole (bytes, text and UTF-8 copy: ~3x in memory); spreadsheet
# exports are far smaller, and a bigger file is asked for in UTF-8, which streams.
MAX_WIDE_BYTES = 128 * 1024 * 1024
EXPECTED = (
    "Expected a fine-tuning dataset: .jsonl (one JSON object per line), .json (an array of rows),"
    " .csv or .parquet, in UTF-8 (or UTF-16 with a BOM), with rows in chat 'messages', ShareGPT"
    " 'conversations' or Alpaca 'instruction'/'output' form."
)

Record = tuple[int, Any, str | None]  # (line/row number, parsed value, parse error)

# Byte-order marks of wide Unicode text; UTF-32 LE first, as it starts with UTF-16 LE's mark.
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
SAVE_AS_UTF8 = (
    "Save it as UTF-8 and load it again (Excel: Save As > 'CSV UTF-8 (Comma delimited)';"
    " Notepad: Save As, Encoding 'UTF-8')."
)


class DatasetError(ValueError):
    """The file is not a usable dataset; the message says what was expected and what to do."""


def file_kind(path: Path) -> str:
    """Decide how to read the file from its first bytes (and its name), or explain why not."""
    if not path.exists():
        raise DatasetError(f"{path} does not exist. Check the path, or upload the file.")
    if path.is_dir():
        raise DatasetError(f"{path} is a folder. Pick one dataset file inside it.")
    try:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as exc:
        raise DatasetError(f"{path} cannot be read: {exc.strerror or exc}.") from exc
    name = path.name
    ext = path.suffix.lower()
    if head.startswith(b"PAR1"):
        return "parquet"
    if ext == ".parquet":
        raise DatasetError(f"{name} is named .parquet but is not a Parquet file. {EXPECTED}")
    encoding = wide_encoding(head)
    if encoding:  # Excel's "Unicode Text": sniff the decoded text
        head = _decode_wide(head, encoding, path, final=False).encode("utf-8")
    if not head.strip(b" \t\r\n\xef\xbb\xbf"):
        raise DatasetError(f"{name} is empty. {EXPECTED}")
    if head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"7z\xbc\xaf")):
        raise DatasetError(f"{name} is a compressed archive. Unpack it first. {EXPECTED}")
    if b"\x00" in head:
        raise DatasetError(f"{name} is a binary file, not text. {EXPECTED}")
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
    if ext == ".txt" and b"\t" in text.split(b"\n", 1)[0]:
        return "csv"  # Excel's "Unicode Text" export: tab-separated, saved as .txt
    if ext in (".json", ".jsonl", ".ndjson"):
        check_decodes(path)
        snippet = text[:60].decode("utf-8", "replace").split("\n")[0].rstrip("\r")
        raise DatasetError(
            f"{name} is not JSON: it starts with {snippet!r} where a JSON object '{{' or array"
            f" '[' was expected. {EXPECTED}"
        )
    raise DatasetError(f"{name}: unsupported file type '{ext or '(none)'}'. {EXPECTED}")


def _looks_like_jsonl(text: bytes) -> bool:
    """A first line that is a complete JSON value followed by more lines means JSON Lines."""
    first, _, rest = text.partition(b"\n")
    if not rest.strip():
        return False
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        return False
    return True


def wide_encoding(head: bytes) -> str | None:
    """The wide encoding (utf-16, utf-32) whose byte-order mark starts `head`, else None."""
    return next((enc for bom, enc in _WIDE_BOMS if head.startswith(bom)), None)


def _decode_wide(raw: bytes, encoding: str, path: Path, final: bool = True) -> str:
    """UTF-16/32 bytes as text (the BOM consumed); a DatasetError where they do not decode.
    `final=False` for a file's first bytes, which may end inside a character."""
    try:
        return codecs.getincrementaldecoder(encoding)("strict").decode(raw, final=final)
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{path.name} starts with a {encoding.upper()} byte-order mark but is not valid"
            f" {encoding.upper()} text (bad bytes at byte {exc.start}). {SAVE_AS_UTF8}"
        ) from None


def open_utf8(path: Path) -> BinaryIO:
    """The file's bytes as UTF-8: the file itself, or UTF-16/32 text decoded once in memory.

    Wide text is read whole: Excel's exports are spreadsheet-sized, and the readers then
    see one encoding, with lines that split at b"\n" as in any UTF-8 file.
    """
    f = path.open("rb")
    encoding = wide_encoding(f.read(4))
    f.seek(0)
    if encoding is None:
        return f
    with f:
        size = path.stat().st_size
        if size >= MAX_WIDE_BYTES:
            raise DatasetError(
                f"{path.name} is {encoding.upper()} text of {size / 2**20:,.0f} MB, which is"
                f" read whole; the limit is {MAX_WIDE_BYTES // 2**20} MB. {SAVE_AS_UTF8}"
            )
        text = _decode_wide(f.read(), encoding, path)
    return io.BytesIO(text.encode("utf-8"))


def check_decodes(path: Path) -> None:
    """Raise one clear message for text that is not UTF-8, naming the line."""
    with open_utf8(path) as f:
        for line_no, raw in enumerate(read_lines(f, path), start=1):
            decode_line(raw, path, line_no)


def read_lines(f: io.BufferedReader, path: Path) -> Iterator[bytes]:
    """Lines of a binary file, refusing a line too long to be one dataset row (or prompt):
    memory stays bounded by MAX_LINE_BYTES whatever the file holds."""
    line_no = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) > MAX_LINE_BYTES:
            raise DatasetError(
                f"{path.name}: line {line_no} is longer than {MAX_LINE_BYTES // 2**20} MB, far"
                f" more than one training example. {EXPECTED}"
            )
        yield raw


def decode_line(raw: bytes, path: Path, line_no: int) -> str:
    """One line as UTF-8 text, or a DatasetError naming the line and the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, raw, line_no, exc.start) from None


# Windows-1258 bytes of Vietnamese: the five combining tone marks, and the vowels a tone mark
# may follow (ASCII, and â ê ô ă ơ ư in either case).
_CP1258_TONES = frozenset(b"\xcc\xec\xde\xd2\xf2")
_CP1258_VOWELS = frozenset(b"aeiouyAEIOUY\xe2\xea\xf4\xe3\xf5\xfd\xc2\xca\xd4\xc3\xd5\xdd")


def guess_code_page(raw: bytes) -> str:
    """The legacy code page non-UTF-8 text looks written in, in words, to name in a message.

    Vietnamese Windows text (cp1258) writes tone marks as combining bytes right after a
    vowel; Western (cp1252) text has those bytes as letters (Ò, ì...) after consonants too.
    """
    tones = [i for i, b in enumerate(raw) if b in _CP1258_TONES and i > 0]
    if tones and sum(raw[i - 1] in _CP1258_VOWELS for i in tones) >= 0.9 * len(tones):
        return "Windows-1258 (Vietnamese)"
    try:
        raw.decode("cp1252")
    except UnicodeDecodeError:
        return "a legacy code page, not UTF-8"
    return "Windows-1252 (Western European)"


def not_utf8(path: Path, raw: bytes, line_no: int, pos: int) -> DatasetError:
    """The error for text that is not UTF-8: where, which code page it looks like, what to do.

    No guess is used to read the file: a code page decodes any byte into some letter, so a
    wrong one would read without error into wrong text (cp1258's tone mark 0xD2 is 'Ò' in
    cp1252)."""
    bad = raw[pos : pos + 1].hex()
    found = guess_code_page(raw[max(0, pos - 4096) : pos + 4096])  # a minified .json is one line
    return DatasetError(
        f"{path.name} is not UTF-8 text: line {line_no} has the byte 0x{bad} at position"
        f" {pos + 1}. It looks like {found}, which the studio does not guess"
        f" at (a wrong code page reads into wrong letters). {SAVE_AS_UTF8}"
    )


def read_jsonl(path: Path) -> list[Record]:
    """Each non-blank line parsed as JSON; a line that is not JSON becomes a row error."""
    records: list[Record] = []
    loads = json.loads
    with open_utf8(path) as f:
        for line_no, raw in enumerate(read_lines(f, path), start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            text = decode_line(raw, path, line_no)
            if not text.strip():
                continue
            try:
                records.append((line_no, loads(text), None))
            except (ValueError, RecursionError) as exc:
                records.append((line_no, None, json_error(exc)))
    if records and all(err is not None for _, _, err in records):
        line_no, _, err = records[0]
        raise DatasetError(f"{path.name} has no JSON rows: line {line_no} is {err}. {EXPECTED}")
    return records


def json_error(exc: ValueError | RecursionError) -> str:
    """Why a piece of JSON did not parse, for a row error. Nesting deeper than the parser's
    recursion limit raises RecursionError, not ValueError: no dataset row is built that way."""
    if isinstance(exc, RecursionError):
        return "invalid JSON: nested too deeply (thousands of levels of [ or {)"
    col = getattr(exc, "colno", None)
    at = f" at column {col}" if col else ""
    return f"invalid JSON{at}: {getattr(exc, 'msg', str(exc))}"


_WS = re.compile(r"[ \t\n\r]*")


def read_json(path: Path) -> list[Record]:
    """A JSON array of rows, or an object holding such an array; rows keep their line numbers."""
    if path.stat().st_size >= MAX_JSON_BYTES:
        raise DatasetError(
            f"{path.name} is {path.stat().st_size / 2**20:,.0f} MB; a .json file is read whole, so"
            f" the limit is {MAX_JSON_BYTES // 2**20} MB. Save it as .jsonl (one row per line),"
            " which is read a line at a time."
        )
    with open_utf8(path) as f:
        raw = f.read().removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = raw.rfind(b"\n", 0, exc.start) + 1
        end = raw.find(b"\n", exc.start)
        line = raw[start : end if end >= 0 else len(raw)]
        line_no = raw.count(b"\n", 0, exc.start) + 1
        raise not_utf8(path, line, line_no, exc.start - start) from None
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
    except RecursionError:
        raise DatasetError(f"{path.name}: {json_error(RecursionError())}.") from None
    end = _WS.match(text, end).end()
    if end < len(text):
        line_no = text.count("\n", 0, end) + 1
        raise DatasetError(
            f"{path.name} is not valid JSON: extra data after the rows at line {line_no}."
        )
    if not records:
        raise DatasetError(f"{path.name} holds an empty list: there are no rows. {EXPECTED}")
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
    if guess_record_format(whole):
        return [(text.count("\n", 0, pos) + 1, whole, None)], end
    lists = [k for k, v in whole.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if not lists:
        keys = ", ".join(list(whole)[:10]) or "(none)"
        raise DatasetError(f"The JSON object holds no list of rows (its keys: {keys}). {EXPECTED}")
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


def detect_format(path: Path, records: list[Record]) -> str:
    """The format most of the first 500 parsed rows have."""
    parsed = []
    for _, rec, err in records:
        if err is None:
            parsed.append(rec)
            if len(parsed) == 500:
                break
    votes = Counter(f for rec in parsed if (f := guess_record_format(rec)))
    if votes:
        return votes.most_common(1)[0][0]
    keys: Counter[str] = Counter()
    for rec in parsed:
        if isinstance(rec, dict):
            keys.update(rec.keys())
    found = ", ".join(k for k, _ in keys.most_common(8)) or "no JSON objects"
    raise DatasetError(
        f"{path.name}: no recognizable dataset format (rows have keys: {found}). Expected"
        " 'messages' (chat), 'conversations' (ShareGPT), 'instruction' + 'output' (Alpaca)"
        " or 'prompt' + 'chosen' + 'rejected' (preference pairs)."
    )


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
        compat.replace(tmp, dest)
    return dest
