"""Dataset loading, validation and normalization (studio.data), on real files in tmp dirs.

The token-length and preview tests use the real SmolLM2 tokenizer (quick: no model weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.data import load as data
from studio.data.chat_format import render, tokenize_conversation
from studio.data.load import load_dataset_file
from studio.data.read import MAX_LINE_BYTES, DatasetError
from studio.data.search import search_rows
from studio.data.split import split_rows, split_sizes, write_normalized
from studio.data.table import table_columns
from studio.data.tokens import (
    _lengths_by_segment,
    _lengths_direct,
    length_stats,
    preview_row,
    token_stats,
)
from studio.plots import length_histogram

VI = "Xin chào, đơn hàng của tôi bị giao nhầm địa chỉ. Tôi cần hỗ trợ gấp ạ!"
TH = "สวัสดีครับ พัสดุของผมยังไม่มาถึงเลย ช่วยตรวจสอบให้หน่อยได้ไหมครับ"


def chat(user: str = "Hi", assistant: str = "Hello!", system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": msgs}


def write_jsonl(path: Path, rows: list, newline: str = "\n", bom: bool = False) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    text = newline.join(lines) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def error_for(report: data.DatasetReport, line: int) -> list[str]:
    return [str(e) for e in report.errors if e.line == line]


# --------------------------------------------------------------------------- formats


def test_messages_jsonl(tmp_path: Path) -> None:
    rows = [chat("a", "b"), chat("c", "d", system="be brief"), chat(VI, TH)]
    report = load_dataset_file(write_jsonl(tmp_path / "d.jsonl", rows))
    assert report.format == "messages" and report.file_kind == "jsonl"
    assert (report.total, report.valid, report.invalid) == (3, 3, 0)
    assert report.rows == rows
    assert report.row_numbers == [1, 2, 3]
    assert report.roles == {"system": 1, "user": 3, "assistant": 3}
    assert report.turns["min"] == 2 and report.turns["max"] == 2


def test_sharegpt_jsonl(tmp_path: Path) -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "You help."},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ]
    }
    report = load_dataset_file(write_jsonl(tmp_path / "s.jsonl", [row, row | {"id": 7}]))
    assert report.format == "sharegpt"
    assert report.valid == 2
    assert [m["role"] for m in report.rows[0]["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    assert report.rows[0]["messages"][4]["content"] == "A2"
    assert report.turns == {"min": 4, "max": 4, "mean": 4.0, "counts": {4: 2}}


def test_alpaca_json_array_keeps_line_numbers(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate", "input": "hello", "output": "xin chào"},
        {"instruction": "Say hi", "output": "hi", "system": "Be kind"},
        {"instruction": "Broken"},
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    report = load_dataset_file(path)
    assert report.format == "alpaca" and report.file_kind == "json"
    assert report.rows[0]["messages"] == [
        {"role": "user", "content": "Translate\n\nhello"},
        {"role": "assistant", "content": "xin chào"},
    ]
    assert report.rows[1]["messages"][0] == {"role": "system", "content": "Be kind"}
    # indent=2 puts each item's "{" on lines 2, 7 and 12.
    assert report.row_numbers == [2, 7]
    assert report.invalid == 1
    assert "line 12" in error_for(report, 12)[0] and "missing key 'output'" in str(report.errors[0])


def test_json_object_holding_a_list(tmp_path: Path) -> None:
    path = tmp_path / "wrapped.json"
    path.write_text(
        '{"name": "demo", "version": 2,\n "data": [\n'
        + ",\n".join(json.dumps(chat(f"q{i}", f"a{i}")) for i in range(3))
        + "\n]}\n",
        encoding="utf-8",
    )
    report = load_dataset_file(path)
    assert report.valid == 3
    assert report.row_numbers == [3, 4, 5]


def test_jsonl_content_in_a_json_file(tmp_path: Path) -> None:
    report = load_dataset_file(write_jsonl(tmp_path / "lines.json", [chat(), chat("x", "y")]))
    assert report.file_kind == "jsonl" and report.valid == 2


def test_csv_columns_are_guessed_and_can_be_mapped(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text(
        'question,answer,notes\nWhat is 2+2?,4,easy\n"Multi\nline question",yes,x\n,empty,z\n',
        encoding="utf-8",
    )
    assert table_columns(path) == ["question", "answer", "notes"]
    report = load_dataset_file(path)
    assert report.format == "alpaca" and report.file_kind == "csv"
    assert report.column_map == {
        "instruction": "question",
        "input": None,
        "output": "answer",
        "system": None,
    }
    assert report.rows[1]["messages"][0]["content"] == "Multi\nline question"
    assert report.row_numbers == [2, 3]  # the quoted record starts on line 3
    assert any("line 5" in e and "empty content" in e for e in error_for(report, 5))

    mapped = load_dataset_file(path, column_map={"instruction": "notes", "output": "answer"})
    assert mapped.rows[0]["messages"] == [
        {"role": "user", "content": "easy"},
        {"role": "assistant", "content": "4"},
    ]
    with pytest.raises(DatasetError, match="column that holds the output"):
        load_dataset_file(path, column_map={"instruction": "question"})
    with pytest.raises(DatasetError, match="no column 'nope'"):
        load_dataset_file(path, column_map={"instruction": "nope", "output": "answer"})


def test_csv_with_a_messages_column(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    cell = json.dumps(chat()["messages"]).replace('"', '""')
    path.write_text(f'id,messages\n1,"{cell}"\n2,not json\n', encoding="utf-8")
    report = load_dataset_file(path)
    assert report.format == "messages" and report.valid == 1
    assert "line 3" in error_for(report, 3)[0] and "not valid JSON" in error_for(report, 3)[0]


def test_parquet_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    table = pa.table({"prompt": ["p1", "p2", ""], "response": ["r1", TH, "r3"]})
    pq.write_table(table, path)
    report = load_dataset_file(path)
    assert report.file_kind == "parquet" and report.unit == "row"
    assert report.rows[1]["messages"][1]["content"] == TH
    assert report.invalid == 1
    assert str(report.errors[0]).startswith("row 3")


def test_format_override(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [chat()])
    report = load_dataset_file(path, fmt="alpaca")
    assert report.valid == 0 and report.invalid == 1
    text = " | ".join(map(str, report.errors))
    assert "missing key 'instruction'" in text and "looks like the messages format" in text
    with pytest.raises(DatasetError, match="Unknown format"):
        load_dataset_file(path, fmt="openai")


# --------------------------------------------------------------------------- row errors


def test_each_row_error_names_its_line(tmp_path: Path) -> None:
    lines = [
        chat(),  # 1 ok
        '{"messages": [{"role": "user", "content": "x"}',  # 2 invalid JSON
        {"conversations": []},  # 3 missing key (messages format)
        chat() | {"extra": 1},  # 4 unknown key
        {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        chat(assistant="   "),  # 6 empty content
        {"messages": [{"role": "assistant", "content": "y"}]},  # 7 no user turn
        {"messages": [{"role": "user", "content": "y"}]},  # 8 no assistant turn
        {"messages": [{"role": "user", "text": "y"}, {"role": "assistant", "content": "z"}]},
        "[1, 2]",  # 10 not an object
        chat("last", "ok"),  # 11 ok
    ]
    report = load_dataset_file(write_jsonl(tmp_path / "bad.jsonl", lines))
    assert (report.total, report.valid, report.invalid) == (11, 2, 9)
    assert report.row_numbers == [1, 11]
    expected = {
        2: "invalid JSON",
        3: "missing key 'messages'",
        4: "unknown key 'extra'",
        5: "unknown role 'bot'",
        6: "empty content",
        7: "no user turn",
        8: "no assistant turn",
        9: "unknown key 'text'",
        10: "expected a JSON object",
    }
    for line, reason in expected.items():
        msgs = error_for(report, line)
        assert msgs, f"no error for line {line}"
        assert any(reason in m and m.startswith(f"line {line}") for m in msgs), msgs


def test_sharegpt_unknown_role_and_alpaca_types(tmp_path: Path) -> None:
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "x"}]}]
    report = load_dataset_file(write_jsonl(tmp_path / "s.jsonl", rows))
    assert "unknown role 'bot'" in str(report.errors[0])
    assert "expected human, gpt or system" in str(report.errors[0])
    rows = [{"instruction": "q", "output": {"a": 1}}, {"instruction": "q", "output": "fine"}]
    report = load_dataset_file(write_jsonl(tmp_path / "a.jsonl", rows))
    assert report.valid == 1 and "must be text" in str(report.errors[0])


def test_role_order_rejected_by_the_chat_template(tmp_path: Path, tokenizer) -> None:
    """A template that demands alternating roles (as Llama 2 / Mistral templates do)."""
    import copy

    strict = copy.copy(tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    )
    rows = [
        chat("q", "a"),
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a"},
            ]
        },
    ]
    path = write_jsonl(tmp_path / "order.jsonl", rows)
    assert load_dataset_file(path).valid == 2  # no tokenizer: no template check
    assert load_dataset_file(path, tokenizer=tokenizer).valid == 2  # ChatML accepts it
    report = load_dataset_file(path, tokenizer=strict)
    assert report.valid == 1 and report.row_numbers == [1]
    msg = str(report.errors[0])
    assert msg.startswith("line 2") and "user, user, assistant" in msg and "alternate" in msg


# --------------------------------------------------------------------------- text handling


def test_bom_and_crlf(tmp_path: Path) -> None:
    rows = [chat(VI, "ok"), chat("two", TH)]
    report = load_dataset_file(write_jsonl(tmp_path / "w.jsonl", rows, "\r\n", bom=True))
    assert report.rows == rows and report.row_numbers == [1, 2]
    csv_path = tmp_path / "w.csv"
    csv_path.write_bytes(
        b"\xef\xbb\xbfinstruction,output\r\n" + f'"{VI}",{TH}\r\n'.encode() + b"b,c\r\nd,e,f\r\n"
    )
    report = load_dataset_file(csv_path)
    assert report.column_map["instruction"] == "instruction"  # BOM not glued to the header
    assert report.rows[0]["messages"][0]["content"] == VI
    assert report.rows[0]["messages"][1]["content"] == TH
    assert report.row_numbers == [2, 3]
    assert "line 4" in str(report.errors[0]) and "3 fields" in str(report.errors[0])


def test_thai_and_vietnamese_round_trip(tmp_path: Path) -> None:
    rows = [chat(VI, TH, system="Trả lời bằng tiếng Việt"), chat(TH + "0812345678ค่ะ", VI)]
    report = load_dataset_file(write_jsonl(tmp_path / "vi_th.jsonl", rows))
    assert report.rows == rows
    out = write_normalized(report.rows, tmp_path / "out" / "norm.jsonl")
    assert load_dataset_file(out).rows == rows
    assert VI in out.read_text(encoding="utf-8")  # written as UTF-8, not \\u escapes
    with pytest.raises(FileExistsError):
        write_normalized(report.rows, out)  # never overwrites


# --------------------------------------------------------------------------- not a dataset


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("img.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary"),
        ("latin1.jsonl", '{"messages": []}\n{"x": "café"}\n'.encode("latin-1"), "not UTF-8"),
        ("utf16.json", b"\xff\xfe[\x00\x00\xd8]\x00", "not valid UTF-16"),  # a lone surrogate
        ("empty.jsonl", b"", "empty"),
        ("blank.json", b"  \n\r\n ", "empty"),
        ("prose.jsonl", b"Dear diary,\ntoday I trained a model.\n", "not JSON"),
        ("notes.txt", b"just some notes\n", "unsupported file type"),
        ("keys.jsonl", b'{"a": 1}\n{"b": 2}\n', "no recognizable dataset format"),
        ("garbage.jsonl", b"{not json at all\n{nope\n", "no JSON rows"),
        ("bad.json", b'[{"messages": []},\n {"oops" 1}]', "not valid JSON"),
        ("nolist.json", b'{"name": "x", "rows": 3}', "no list of rows"),
        ("emptylist.json", b"[]", "no rows"),
        ("fake.parquet", b"hello world", "not a Parquet file"),
        ("archive.jsonl", b"PK\x03\x04rest-of-zip", "compressed archive"),
        ("head.csv", b"instruction,output\n", "no rows"),
    ],
)
def test_not_a_dataset_gets_one_clear_message(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError) as info:
        load_dataset_file(path)
    msg = str(info.value)
    assert expected in msg
    assert "Traceback" not in msg and len(msg) < 600


def test_undecodable_text_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(json.dumps(chat()).encode() + b"\n" + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match=r"line 2 has the byte 0xe9.*Save it as UTF-8"):
        load_dataset_file(path)


def test_huge_single_line(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    path.write_bytes(b'{"messages": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}')
    with pytest.raises(DatasetError, match="line 1 is longer than 8 MB"):
        load_dataset_file(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset_file(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="is a folder"):
        load_dataset_file(tmp_path)


# --------------------------------------------------------------------------- inspection


def test_duplicates_and_json_check(tmp_path: Path) -> None:
    a, b = chat("q", '{"x": 1}'), chat("q2", "not json")
    rows = [a, b, a, chat("q3", "[1, 2]"), a, b]
    report = load_dataset_file(write_jsonl(tmp_path / "dup.jsonl", rows), json_check=True)
    assert sorted(report.duplicates) == [[1, 3, 5], [2, 6]]
    assert report.duplicate_rows == 3
    jc = report.json_check
    assert (jc["checked"], jc["passed"], jc["failed"]) == (6, 4, 2)
    assert jc["failed_rows"] == [2, 6]
    assert load_dataset_file(tmp_path / "dup.jsonl").json_check is None


def test_split_is_deterministic() -> None:
    rows = list(range(1000))
    train, val = split_rows(rows, 0.1, seed=42)
    assert (len(train), len(val)) == (900, 100) == split_sizes(1000, 0.1)
    assert sorted(train + val) == rows and not set(train) & set(val)
    assert split_rows(rows, 0.1, seed=42) == (train, val)
    assert split_rows(rows, 0.1, seed=7)[1] != val
    assert split_rows([1], 0.1) == ([1], [])
    assert split_sizes(5, 0.1) == (4, 1)
    assert split_rows(rows, 0.0) == (rows, [])


def test_search_rows() -> None:
    rows = [chat(f"question {i}", VI if i % 2 else "plain") for i in range(45)]
    numbers = [i + 10 for i in range(45)]
    page = search_rows(rows, numbers, "", page=3, page_size=20)
    assert page["pages"] == 3 and page["page"] == 3 and len(page["items"]) == 5
    hits = search_rows(rows, numbers, "ĐƠN HÀNG", page_size=100)
    assert hits["matches"] == 22
    by_line = search_rows(rows, numbers, "12")
    assert by_line["items"][0]["line"] == 12  # line 12 = "question 2"


# --------------------------------------------------------------------------- tokens


def test_token_stats_match_training_tokenization(tokenizer) -> None:
    rows = [
        chat("hi", "hello"),
        chat(VI * 3, TH * 3, system="Reply briefly."),
        chat(TH, '{"category": "shipping"}'),
    ]
    stats = token_stats(rows, tokenizer, max_len=100)
    exact = [len(tokenize_conversation(tokenizer, r["messages"]).input_ids) for r in rows]
    assert stats["lengths"] == exact
    assert stats["max"] == max(exact) and stats["p50"] == sorted(exact)[1]
    assert stats["over_max_len"] == sum(n > 100 for n in exact) >= 1
    assert stats["over_rows"] == [i for i, n in enumerate(exact) if n > 100]
    fig = length_histogram(stats)
    assert list(fig.data[0].x) == exact
    wider = length_stats(stats["lengths"], max_len=10_000)
    assert wider["over_max_len"] == 0 and wider["p95"] == stats["p95"]
    assert length_stats([], 512)["p50"] == 0


def test_token_lengths_whole_text_path_agrees(tokenizer) -> None:
    """The piece-wise counting shortcut gives exactly the whole-text counts."""
    rows = [chat(f"{VI} {i}", f"{TH} {i}", system="Same system prompt") for i in range(300)]
    texts = [render(tokenizer, r["messages"]) for r in rows]
    assert _lengths_by_segment(tokenizer, texts) == _lengths_direct(tokenizer, texts)


def test_preview_marks_assistant_turns_and_their_eos_as_trained(tokenizer) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": VI},
            {"role": "assistant", "content": '{"a": 1}'},
            {"role": "user", "content": TH},
            {"role": "assistant", "content": "สวัสดี"},
        ]
    }
    segments = preview_row(row, tokenizer, max_len=512)
    assert "".join(t for t, _ in segments) == render(tokenizer, row["messages"])
    trained = [t for t, flag in segments if flag]
    eos = tokenizer.eos_token
    assert trained == ['{"a": 1}' + eos, "สวัสดี" + eos]
    untrained = "".join(t for t, flag in segments if not flag)
    assert VI in untrained and TH in untrained and "Answer in JSON." in untrained

    short = preview_row(row, tokenizer, max_len=20)
    text = "".join(t for t, _ in short)
    assert render(tokenizer, row["messages"]).startswith(text) and len(text) < 120
    assert not any(flag for _, flag in short)


def test_sample_dataset_loads_clean(tokenizer) -> None:
    report = load_dataset_file(data.SAMPLE_DATASET, tokenizer=tokenizer, json_check=True)
    assert report.format == "messages" and report.invalid == 0 and report.valid >= 100
    assert report.json_check["failed"] == 0
    assert report.duplicates  # the sample plants exact duplicates on purpose
