"""Fuzzing the readers: every malformed file gets a clear message, never a traceback.

Each dataset reader (JSON, JSON Lines, CSV, Parquet through `load_dataset_file`) and Chat's
prompt-file reader (`load_prompt_file`) gets at least 1,000 generated inputs from hypothesis:
random bytes, truncated and deeply nested JSON, long lines, wrong types in every field, mixed
encodings and byte-order marks. An input passes when the reader returns its result (bad rows
reported as row errors) or raises its own error type (`DatasetError` / `ChatError`) with a
message; anything else is an unhandled error. The runs are seeded (`derandomize`) and bounded
(`max_examples`, no deadline) so CI sees the same inputs every time.

Large files: a 1 GB file and a 100 MB single line are read in a child process; the growth of
its resident memory (psutil's RSS before the read against the kernel's high-water mark VmHWM,
reset just before the read, which a sampling poll could miss) must stay far below the file
size, or the file is refused with a message.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from studio.chat.engine import ChatError
from studio.chat.evaluate import BatchItem, load_prompt_file
from studio.data.load import DatasetError, DatasetReport, RowError, load_dataset_file

EXAMPLES = 1000
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Field names the readers look for, so generated rows reach the row checks, not only the parser.
FIELDS = (
    "messages", "conversations", "role", "content", "from", "value", "instruction", "input",
    "output", "system", "prompt", "reference", "question", "answer", "text", "id", "query",
    "response", "expected",
)  # fmt: skip
ROLE_NAMES = ("system", "user", "assistant", "human", "gpt", "tool", "", "USER")
BOMS = (b"", b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")
ENCODINGS = (
    "utf-8",
    "utf-8-sig",
    "utf-16",
    "utf-16-le",
    "utf-16-be",
    "utf-32",
    "latin-1",
    "cp1252",
)

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and infinities too: json.dumps writes them, json.loads reads them back
    st.text(max_size=30),
    st.sampled_from(ROLE_NAMES),
)
json_value = st.recursive(
    leaf,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
turn = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(ROLE_NAMES) | json_value,
        "content": st.text(max_size=40) | json_value,
        "from": st.sampled_from(ROLE_NAMES) | json_value,
        "value": st.text(max_size=40) | json_value,
    },
)
ALPACA_LIKE = ("instruction", "input", "output", "system", "prompt", "reference")
# Rows that look like a dataset row, with any field of any type: the row checks see them.
row = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4) | json_value}),
    st.fixed_dictionaries({"conversations": st.lists(turn, max_size=4) | json_value}),
    st.fixed_dictionaries({}, optional={f: st.text(max_size=40) | json_value for f in ALPACA_LIKE}),
    json_value,
)


@st.composite
def deep_json(draw: st.DrawFn) -> str:
    """JSON nested far past the parser's recursion limit, alone or inside a row."""
    depth = draw(st.sampled_from((1, 50, 900, 5_000, 100_000)))
    opener, closer = draw(st.sampled_from((("[", "]"), ('{"a":', "}"), ('{"messages":[', "]}"))))
    closed = draw(st.booleans())
    body = opener * depth + ("1" + closer * depth if closed else "")
    return draw(st.sampled_from((body, f'{{"messages": {body}}}', f"[{body}]")))


@st.composite
def long_line(draw: st.DrawFn) -> str:
    """One row whose text is long (up to 300 kB) or holds characters that break lines."""
    n = draw(st.integers(min_value=0, max_value=300_000))
    filler = draw(st.sampled_from(("x", "é", "\u2028", "\x85", "\r", "ก", "\ufeff", "\\")))
    return json.dumps({"messages": [{"role": "user", "content": filler * n}]})


def _lines_doc(rows: list[Any], ascii_only: bool) -> str:
    return "\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in rows)


json_text = st.one_of(
    st.builds(_lines_doc, st.lists(row, max_size=6), st.booleans()),
    st.builds(json.dumps, st.lists(row, max_size=6)),
    st.builds(
        lambda k, rs: json.dumps({k: rs}), st.sampled_from(FIELDS), st.lists(row, max_size=5)
    ),
    st.builds(json.dumps, row),
    deep_json(),
    long_line(),
    st.text(max_size=300),
)


def _encode(text: str, encoding: str) -> bytes:
    return text.encode(encoding, errors="replace")


@st.composite
def mangled(draw: st.DrawFn, text: st.SearchStrategy[str]) -> bytes:
    """Text as bytes, then damaged: another encoding per line, stray BOMs, truncation, junk."""
    doc = draw(text)
    if draw(st.booleans()):
        data = _encode(doc, draw(st.sampled_from(ENCODINGS)))
    else:  # mixed encodings: each line its own
        lines = doc.split("\n")
        encs = draw(st.lists(st.sampled_from(ENCODINGS), min_size=len(lines), max_size=len(lines)))
        data = b"\n".join(_encode(ln, e) for ln, e in zip(lines, encs, strict=True))
    data = draw(st.sampled_from(BOMS)) + data
    if data and draw(st.booleans()):  # truncated anywhere, mid-character included
        data = data[: draw(st.integers(min_value=0, max_value=len(data)))]
    if draw(st.booleans()):
        pos = draw(st.integers(min_value=0, max_value=len(data)))
        data = data[:pos] + draw(st.binary(max_size=8) | st.sampled_from(BOMS)) + data[pos:]
    return data


random_bytes = st.binary(max_size=4000)
utf8 = st.builds(str.encode, json_text)  # well-formed text, so the rows reach the row checks
json_bytes = st.one_of(random_bytes, mangled(json_text), utf8)

cell = st.one_of(
    st.text(max_size=30),
    st.sampled_from(('"', '""', '"a,b"', "\n", "\r\n", "\u2028", ",", ";", "\t", "\x00")),
    st.builds(json.dumps, st.lists(turn, max_size=3)),
    st.builds(lambda v: json.dumps(v)[:-1], st.lists(turn, min_size=1, max_size=3)),
)


@st.composite
def csv_text(draw: st.DrawFn) -> str:
    """A table with likely and unlikely columns, ragged rows, quotes and line breaks in cells."""
    sep = draw(st.sampled_from((",", ";", "\t", "|")))
    header = draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=8), max_size=5))
    rows = draw(st.lists(st.lists(cell, max_size=6), max_size=6))
    end = draw(st.sampled_from(("\n", "\r\n", "\r")))
    return end.join(sep.join(r) for r in [header, *rows])


csv_bytes = st.one_of(
    random_bytes, mangled(csv_text()), st.builds(str.encode, csv_text()), mangled(json_text)
)

COLUMN_KINDS: dict[str, st.SearchStrategy[Any]] = {
    "int": st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.none(),
    "float": st.floats() | st.none(),
    "bool": st.booleans() | st.none(),
    "text": st.text(max_size=30) | st.none(),
    "bytes": st.binary(max_size=20) | st.none(),
    "json": st.builds(json.dumps, st.lists(turn, max_size=3)) | st.text(max_size=10),
    "texts": st.lists(st.text(max_size=10), max_size=3) | st.none(),
    "turns": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(ROLE_NAMES), "content": st.text(max_size=20)}
        ),
        max_size=3,
    ),
    "null": st.none(),
}


@st.composite
def parquet_bytes(draw: st.DrawFn) -> bytes:
    """A real Parquet file of typed columns (wrong types included), sometimes cut or corrupted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_rows = draw(st.integers(min_value=0, max_value=5))
    names = draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=6), max_size=4, unique=True))
    data = {}
    for name in names:
        kind = draw(st.sampled_from(sorted(COLUMN_KINDS)))
        data[name] = draw(st.lists(COLUMN_KINDS[kind], min_size=n_rows, max_size=n_rows))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pydict(data) if data else pa.table({}), buf)
    raw = buf.getvalue()
    how = draw(st.sampled_from(("whole", "truncated", "corrupted")))
    if how == "truncated":
        raw = raw[: draw(st.integers(min_value=0, max_value=len(raw)))]
    elif how == "corrupted":
        pos = draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw = raw[:pos] + bytes([raw[pos] ^ 0xFF]) + raw[pos + 1 :]
    return raw


parquet_inputs = st.one_of(
    parquet_bytes(),
    st.builds(lambda b: b"PAR1" + b, random_bytes),
    random_bytes,
    mangled(json_text),
)
formats = st.sampled_from(("auto", "messages", "sharegpt", "alpaca"))


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def check_dataset(path: Path, fmt: str) -> None:
    """The loader's contract: a report whose bad rows are row errors, or one DatasetError."""
    try:
        report = load_dataset_file(path, fmt=fmt, json_check=True)
    except DatasetError as exc:
        assert str(exc).strip(), "a DatasetError without a message"
        return
    assert isinstance(report, DatasetReport)
    assert report.valid == len(report.rows) == len(report.row_numbers)
    assert report.format in ("messages", "sharegpt", "alpaca")
    for err in report.errors:
        assert isinstance(err, RowError) and err.message.strip()
        assert str(err).startswith(("line ", "row "))
    for r in report.rows:
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in r["messages"])


def check_prompts(path: Path) -> None:
    """Chat's contract: prompts with text, or one ChatError naming the problem."""
    try:
        items = load_prompt_file(path)
    except ChatError as exc:
        assert str(exc).strip(), "a ChatError without a message"
        return
    assert items and all(isinstance(i, BatchItem) for i in items)
    for item in items:
        assert all(isinstance(m["content"], str) for m in item.messages)


@FUZZ
@given(data=json_bytes, fmt=formats)
def test_jsonl_reader_fuzz(fuzz_dir: Path, data: bytes, fmt: str) -> None:
    check_dataset(_write(fuzz_dir, "rows.jsonl", data), fmt)


@FUZZ
@given(data=json_bytes, fmt=formats)
def test_json_reader_fuzz(fuzz_dir: Path, data: bytes, fmt: str) -> None:
    check_dataset(_write(fuzz_dir, "rows.json", data), fmt)


@FUZZ
@given(data=csv_bytes, fmt=formats, ext=st.sampled_from(("csv", "tsv")))
def test_csv_reader_fuzz(fuzz_dir: Path, data: bytes, fmt: str, ext: str) -> None:
    check_dataset(_write(fuzz_dir, f"rows.{ext}", data), fmt)


@FUZZ
@given(data=parquet_inputs, fmt=formats)
def test_parquet_reader_fuzz(fuzz_dir: Path, data: bytes, fmt: str) -> None:
    check_dataset(_write(fuzz_dir, "rows.parquet", data), fmt)


# Each kind of prompt file with inputs made for it, plus any bytes under any name.
prompt_files = st.one_of(
    st.tuples(st.sampled_from(("jsonl", "json")), json_bytes),
    st.tuples(st.sampled_from(("csv", "tsv")), csv_bytes),
    st.tuples(st.just("parquet"), parquet_inputs),
    st.tuples(st.just("txt"), mangled(st.text(max_size=300)) | random_bytes),
    st.tuples(st.sampled_from(("jsonl", "json", "csv", "parquet", "txt", "dat")), random_bytes),
)


@FUZZ
@given(file=prompt_files)
def test_prompt_file_reader_fuzz(fuzz_dir: Path, file: tuple[str, bytes]) -> None:
    ext, data = file
    check_prompts(_write(fuzz_dir, f"prompts.{ext}", data))


# --- large files: bounded memory, or a refusal --------------------------------------------

_PEAK_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import psutil
    from studio.chat.engine import ChatError
    from studio.chat.evaluate import load_prompt_file
    from studio.data.load import DatasetError, load_dataset_file

    def high_water():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    before = psutil.Process().memory_info().rss
    # Reset the kernel's peak-RSS mark, so the imports' own peak cannot hide the read's.
    Path("/proc/self/clear_refs").write_text("5")
    reader = load_prompt_file if sys.argv[2] == "prompts" else load_dataset_file
    try:
        reader(sys.argv[1])
        outcome = "read"
    except (DatasetError, ChatError) as exc:
        outcome = "refused: " + str(exc)
    print(json.dumps({"outcome": outcome, "growth": high_water() - before}))
    """
)


def peak_growth(path: Path, reader: str = "dataset") -> tuple[str, int]:
    """(outcome, peak RSS growth in bytes) of reading path in a fresh process."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_CHILD, str(path), reader],
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["outcome"], result["growth"]


GB = 1024**3
MB = 1024**2


ROW = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
# Real text for well past the first 64 kB the kind is sniffed from, so the refusal cannot
# come from spotting zero bytes there.
HEADS = {
    "jsonl": (ROW + b"\n") * 2000,
    "json": b"[" + (ROW + b",\n") * 2000,
    "csv": b"instruction,output\n" + b"hi,there\n" * 20000,
    "parquet": b"PAR1" + b"x" * 100_000,
    "txt": b"What is the capital of France?\n" * 5000,
}


@pytest.mark.parametrize("ext", sorted(HEADS))
def test_one_gigabyte_file_is_refused_in_bounded_memory(tmp_path: Path, ext: str) -> None:
    """A 1 GB file (real rows, then a sparse gigabyte: nothing written to disk) is refused with
    a message, and never held whole: peak memory grows by a few MB, not a gigabyte."""
    path = tmp_path / f"big.{ext}"
    path.write_bytes(HEADS[ext])
    with path.open("r+b") as f:
        f.truncate(GB)
    outcome, growth = peak_growth(path, "prompts" if ext == "txt" else "dataset")
    print(f"1 GB .{ext}: {outcome[:100]}; peak RSS growth {growth / MB:.1f} MB")
    assert outcome.startswith("refused: "), outcome
    assert growth < 64 * MB, f"{ext}: peak memory grew {growth / MB:.0f} MB for {outcome}"


LINE = 100 * MB


@pytest.mark.parametrize("ext", ["jsonl", "csv", "txt"])
def test_hundred_megabyte_single_line_is_refused_in_bounded_memory(
    tmp_path: Path, ext: str
) -> None:
    """Line-based files: a 100 MB line is no training example or prompt, so it is refused
    after reading at most MAX_LINE_BYTES of it."""
    text = b"x" * LINE
    body = {
        "jsonl": b'{"messages": [{"role": "user", "content": "' + text + b'"}]}\n',
        "csv": b"instruction,output\n" + text + b",there\n",
        "txt": text + b"\n",
    }[ext]
    path = tmp_path / f"line.{ext}"
    path.write_bytes(body)
    del body, text
    outcome, growth = peak_growth(path, "prompts" if ext == "txt" else "dataset")
    print(f"100 MB line .{ext}: {outcome[:100]}; peak RSS growth {growth / MB:.1f} MB")
    assert outcome.startswith("refused: ") and " MB" in outcome, outcome
    assert growth < 64 * MB, f"{ext}: peak memory grew {growth / MB:.0f} MB for {outcome}"


def test_hundred_megabyte_single_line_json_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """A .json document is one value (minified JSON is one line), parsed whole under the
    MAX_JSON_BYTES cap: memory is bounded by a small multiple of the file, never unbounded."""
    path = tmp_path / "line.json"
    path.write_bytes(b'[{"instruction": "' + b"x" * LINE + b'", "output": "ok"}]')
    outcome, growth = peak_growth(path)
    print(f"100 MB line .json: {outcome[:100]}; peak RSS growth {growth / MB:.1f} MB")
    assert outcome == "read" or outcome.startswith("refused: "), outcome
    assert growth < 5 * LINE, f"peak memory grew {growth / MB:.0f} MB for a 100 MB file"
