"""The dataset formats people bring (issue 27): OpenAI's chat fine-tuning rows (`weight`,
`name`, tool calls), Excel's encodings (UTF-16 "Unicode Text", `;` CSV with a BOM), legacy
Windows code pages, and CSVs the studio writes that Excel must open right.

Quick except the browser test: the label checks use the real embedded tokenizer, no model.
Expected values are written out by hand from the files built here, not read from the code.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from pathlib import Path

import pytest

from studio.config import RunConfig
from studio.data.load import DatasetError, load_dataset_file
from studio.data.tokens import preview_row
from studio.train.prepare import load_training_rows, tokenize_rows

VI = "Xin chào, tôi quên mật khẩu rồi."  # Vietnamese, precomposed (NFC) as typed on Windows
TH = "สวัสดีครับ ลืมรหัสผ่าน"  # Thai with combining vowel and tone marks
REPLY_SKIPPED = "Tôi không biết đâu."  # weight 0: a bad first answer kept as context
REPLY_TRAINED = "Bấm Quên mật khẩu trên trang đăng nhập."
IM_END = "<|im_end|>"  # SmolLM2's ChatML template closes every turn with it

OPENAI_ROW = {
    "messages": [
        {"role": "system", "content": "You are Mai, a polite support agent."},
        {"role": "user", "content": VI, "name": "lan"},
        {"role": "assistant", "content": REPLY_SKIPPED, "weight": 0},
        {"role": "user", "content": "Bạn giúp tôi được không?", "name": "lan"},
        {"role": "assistant", "content": REPLY_TRAINED, "weight": 1, "name": "mai"},
    ]
}
PLAIN_ROW = {
    "messages": [
        {"role": "user", "content": TH},
        {"role": "assistant", "content": "ไปที่หน้าเข้าสู่ระบบครับ"},
    ]
}
TOOL_ROWS = [
    {  # OpenAI function calling: an assistant tool call, then the tool's answer
        "messages": [
            {"role": "user", "content": "Weather in Hanoi?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Hanoi"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "31C"},
            {"role": "assistant", "content": "It is 31°C in Hanoi."},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather"}}],
    },
    {  # the older function_call form
        "messages": [
            {"role": "user", "content": "Time in Bangkok?"},
            {"role": "assistant", "function_call": {"name": "now", "arguments": "{}"}},
            {"role": "function", "name": "now", "content": "14:00"},
            {"role": "assistant", "content": "It is 14:00."},
        ]
    },
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


# --------------------------------------------------------------------------- OpenAI format


def test_openai_rows_with_weight_and_name_are_read(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "openai.jsonl", [OPENAI_ROW, PLAIN_ROW])
    report = load_dataset_file(path)
    assert (report.format, report.valid, report.invalid, report.errors) == ("messages", 2, 0, [])
    assert report.rows[0]["messages"] == [
        {"role": "system", "content": "You are Mai, a polite support agent."},
        {"role": "user", "content": VI},
        {"role": "assistant", "content": REPLY_SKIPPED, "weight": 0},
        {"role": "user", "content": "Bạn giúp tôi được không?"},
        {"role": "assistant", "content": REPLY_TRAINED},
    ]
    assert report.rows[1] == PLAIN_ROW  # rows without weights are read as before
    name_notes = [n for n in report.notes if "'name'" in n]
    assert len(name_notes) == 1 and "ignored" in name_notes[0]  # one note for the file
    assert any("1 assistant reply has weight 0" in n for n in report.notes)


def test_openai_rows_in_parquet_read_with_nulls_for_unset_keys(tmp_path: Path) -> None:
    """A table gives every message every key, null where a row left it out (Parquet files,
    hub datasets): a null weight trains, a null name makes no note."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    weighted = {
        "messages": [
            {"role": "user", "content": "Hi", "weight": None, "name": None},
            {"role": "assistant", "content": "Wrong.", "weight": 0},
            {"role": "user", "content": "Again?", "weight": None},
            {"role": "assistant", "content": "Right.", "weight": 1},
        ]
    }
    path = tmp_path / "weights.parquet"
    pq.write_table(pa.Table.from_pylist([PLAIN_ROW, weighted]), path)
    report = load_dataset_file(path)
    assert (report.valid, report.errors) == (2, [])
    assert report.rows[0] == PLAIN_ROW
    assert [m.get("weight") for m in report.rows[1]["messages"]] == [None, 0, None, None]
    assert not [n for n in report.notes if "'name'" in n]

    named = tmp_path / "named.parquet"
    pq.write_table(pa.Table.from_pylist([PLAIN_ROW, OPENAI_ROW]), named)
    report = load_dataset_file(named)
    assert report.valid == 2 and len([n for n in report.notes if "'name'" in n]) == 1


def test_the_row_browser_marks_a_weight_0_reply(tmp_path: Path) -> None:
    from studio.data.search import search_rows

    report = load_dataset_file(write_jsonl(tmp_path / "openai.jsonl", [OPENAI_ROW]))
    (item,) = search_rows(report.rows, report.row_numbers, max_chars=1000)["items"]
    assert item["assistant"] == f"(weight 0, not trained) {REPLY_SKIPPED}\n---\n{REPLY_TRAINED}"


def test_the_json_check_reads_only_trained_replies(tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "user", "content": "Order 7 status?"},
            {"role": "assistant", "content": "It is on its way.", "weight": 0},
            {"role": "user", "content": "As JSON please."},
            {"role": "assistant", "content": '{"order": 7, "status": "shipped"}'},
        ]
    }
    report = load_dataset_file(write_jsonl(tmp_path / "j.jsonl", [row]), json_check=True)
    assert (report.json_check["passed"], report.json_check["failed"]) == (1, 0)


@pytest.mark.parametrize(
    ("weight", "reason"),
    [(2, "weight must be 0 or 1, got 2"), ("0", "weight must be 0 or 1, got text")],
)
def test_a_weight_other_than_0_or_1_is_a_row_error(tmp_path: Path, weight, reason: str) -> None:
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad["messages"][1]["weight"] = weight
    report = load_dataset_file(write_jsonl(tmp_path / "w.jsonl", [PLAIN_ROW, bad]))
    assert report.valid == 1
    assert [(e.line, e.field, e.message) for e in report.errors] == [
        (2, "messages[1].weight", reason)
    ]


def test_a_row_with_every_reply_at_weight_0_has_nothing_to_train(tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo", "weight": 0},
        ]
    }
    report = load_dataset_file(write_jsonl(tmp_path / "w0.jsonl", [PLAIN_ROW, row]))
    assert report.valid == 1 and [e.line for e in report.errors] == [2]
    assert "weight 0" in report.errors[0].message


def test_tool_call_rows_are_counted_not_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "tools.jsonl", [PLAIN_ROW, *TOOL_ROWS, OPENAI_ROW])
    report = load_dataset_file(path)
    assert (report.total, report.valid, report.invalid, report.errors) == (4, 2, 0, [])
    assert report.tool_rows == [2, 3]
    assert report.summary()["tool_rows"] == 2
    tool_notes = [n for n in report.notes if "not supported yet" in n]
    assert len(tool_notes) == 1 and "2 rows call tools" in tool_notes[0]
    assert "lines 2, 3" in tool_notes[0]


def test_a_runs_log_and_metadata_say_the_datasets_notes(
    tmp_path: Path, studio_home: Path, embedded_model
) -> None:
    """The CLI and the Train tab print the run's log: the rows left out are said there too,
    not only in the Dataset tab's summary."""
    from studio import runs
    from studio.train.prepare import prepare_run, tokenize_run

    rows = [PLAIN_ROW, *TOOL_ROWS, OPENAI_ROW, PLAIN_ROW, OPENAI_ROW]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    cfg = RunConfig(dataset_path=str(path), device="cpu", val_fraction=0.0, allow_pii=True)
    run = prepare_run(cfg)
    said: list[str] = []
    try:
        tokenize_run(run, said.append)
    finally:
        runs.mark_done(run.run_dir)
    notes = runs.read_metadata(run.run_dir)["dataset"]["notes"]
    assert any("2 rows call tools" in n for n in notes), notes
    assert any("weight 0" in n for n in notes), notes
    assert [line for line in said if line in notes] == notes


def test_empty_tool_fields_do_not_make_a_tool_row(tmp_path: Path) -> None:
    """Exports write "tool_calls": null on plain replies and "tools": [] on plain rows."""
    row = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo", "tool_calls": None, "function_call": None},
        ],
        "tools": [],
    }
    report = load_dataset_file(write_jsonl(tmp_path / "empty-tools.jsonl", [row]))
    assert (report.valid, report.errors, report.tool_rows) == (1, [], [])
    assert report.rows[0]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]


def _trained_runs(tok, input_ids: list[int], labels: list[int]) -> list[str]:
    """The trained stretches of a row, decoded: what the loss is computed on."""
    runs: list[list[int]] = []
    for i, (tid, lab) in enumerate(zip(input_ids, labels, strict=True)):
        if lab == -100:
            continue
        assert lab == tid
        if runs and labels[i - 1] != -100:
            runs[-1].append(tid)
        else:
            runs.append([tid])
    return [tok.decode(r) for r in runs]


def test_weight_0_replies_are_masked_in_the_labels_the_trainer_sees(
    tmp_path: Path, tokenizer
) -> None:
    """File -> loader -> the run's rows -> tokenize_rows, the path a run takes to its labels."""
    path = write_jsonl(tmp_path / "openai.jsonl", [OPENAI_ROW])
    cfg = RunConfig(dataset_path=str(path))
    rows = load_training_rows(cfg)
    (weighted,), _ = tokenize_rows(tokenizer, rows, cfg)
    unweighted = [
        {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in rows[0]["messages"]]}
    ]
    (plain,), _ = tokenize_rows(tokenizer, unweighted, cfg)

    assert weighted["input_ids"] == plain["input_ids"]  # the skipped reply stays in the context
    assert REPLY_SKIPPED in tokenizer.decode(weighted["input_ids"])
    assert _trained_runs(tokenizer, **weighted) == [REPLY_TRAINED + IM_END]
    assert _trained_runs(tokenizer, **plain) == [REPLY_SKIPPED + IM_END, REPLY_TRAINED + IM_END]


def test_weight_0_replies_stay_out_of_the_loss_when_every_token_trains(
    tmp_path: Path, tokenizer
) -> None:
    """Loss on every token (assistant_only_loss off) trains the prompts too, but a weight-0
    reply is the user's explicit "do not learn this": its tokens stay masked."""
    path = write_jsonl(tmp_path / "openai.jsonl", [OPENAI_ROW])
    cfg = RunConfig(dataset_path=str(path), assistant_only_loss=False)
    (row,), _ = tokenize_rows(tokenizer, load_training_rows(cfg), cfg)
    runs = _trained_runs(tokenizer, **row)
    assert len(runs) == 2
    assert runs[0].endswith("<|im_start|>assistant\n") and VI in runs[0]  # the prompt trains
    assert runs[1].startswith("\n<|im_start|>user\nBạn giúp tôi")  # from the end of the skip
    assert runs[1].endswith(REPLY_TRAINED + IM_END + "\n")
    assert REPLY_SKIPPED not in "".join(runs)


def test_the_preview_shows_a_weight_0_reply_as_context(tmp_path: Path, tokenizer) -> None:
    report = load_dataset_file(write_jsonl(tmp_path / "openai.jsonl", [OPENAI_ROW]))
    segments = preview_row(report.rows[0], tokenizer)
    trained = [text for text, flag in segments if flag]
    context = "".join(text for text, flag in segments if not flag)
    assert trained == [REPLY_TRAINED + IM_END]
    assert REPLY_SKIPPED in context


def test_a_last_reply_at_weight_0_gets_no_trained_eos(tokenizer) -> None:
    """A template that writes no end-of-turn marker gets EOS appended after a trained last
    reply; after a weight-0 last reply nothing is appended, and the Dataset tab's token count
    still equals what training tokenizes."""
    import copy

    from studio.data.chat_format import tokenize_conversation
    from studio.data.tokens import token_lengths

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you.", "weight": 0},
    ]
    tc = tokenize_conversation(tok, messages)
    assert tc.input_ids[-1] != tok.eos_token_id
    trained = [i for i, m in zip(tc.input_ids, tc.assistant_mask, strict=True) if m]
    assert tok.decode(trained).strip() == "Hello there."  # BPE glues the space before it
    assert token_lengths([{"messages": messages}], tok) == [len(tc.input_ids)]
    messages[-1] = {"role": "assistant", "content": "See you."}  # trained: EOS appended
    tc = tokenize_conversation(tok, messages)
    assert tc.input_ids[-1] == tok.eos_token_id and tc.assistant_mask[-1] == 1
    assert token_lengths([{"messages": messages}], tok) == [len(tc.input_ids)]


# --------------------------------------------------------------------------- encodings

TABLE = [("instruction", "output"), (VI, "Bấm Quên mật khẩu."), (TH, "ไปที่หน้าเข้าสู่ระบบ")]
EXPECTED_TABLE_ROWS = [
    [{"role": "user", "content": VI}, {"role": "assistant", "content": "Bấm Quên mật khẩu."}],
    [{"role": "user", "content": TH}, {"role": "assistant", "content": "ไปที่หน้าเข้าสู่ระบบ"}],
]


def _table_text(sep: str) -> str:
    """The table as Excel writes it: cells with the separator in them quoted, CRLF line ends."""
    out = io.StringIO()
    csv.writer(out, delimiter=sep, lineterminator="\r\n").writerows(TABLE)
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "sep", "encoding", "bom"),
    [
        ("unicode-text.txt", "\t", "utf-16-le", b"\xff\xfe"),  # Excel "Unicode Text"
        ("csv-utf16.csv", ",", "utf-16-le", b"\xff\xfe"),  # Excel "CSV UTF-16"
        ("big-endian.tsv", "\t", "utf-16-be", b"\xfe\xff"),
        ("europe.csv", ";", "utf-8", b"\xef\xbb\xbf"),  # European Excel: ';' and a UTF-8 BOM
    ],
)
def test_excel_exports_are_read(tmp_path: Path, name: str, sep: str, encoding: str, bom: bytes):
    path = tmp_path / name
    path.write_bytes(bom + _table_text(sep).encode(encoding))
    report = load_dataset_file(path)
    assert (report.file_kind, report.format, report.errors) == ("csv", "alpaca", [])
    assert [r["messages"] for r in report.rows] == EXPECTED_TABLE_ROWS
    assert report.row_numbers == [2, 3]


def test_a_utf16_jsonl_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "notepad.jsonl"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in (PLAIN_ROW, OPENAI_ROW))
    path.write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
    report = load_dataset_file(path)
    assert report.valid == 2 and report.rows[0] == PLAIN_ROW


def test_utf16_table_columns_are_offered_for_mapping(tmp_path: Path) -> None:
    """The Dataset tab's column-mapping controls read the header of a UTF-16 table too."""
    from studio.data.table import table_columns

    path = tmp_path / "unicode-text.txt"
    header = "câu hỏi\ttrả lời\tghi chú\r\n"
    path.write_bytes(b"\xff\xfe" + (header + "a\tb\tc\r\n").encode("utf-16-le"))
    assert table_columns(path) == ["câu hỏi", "trả lời", "ghi chú"]


def test_a_huge_utf16_file_is_refused_before_it_is_read_whole(tmp_path: Path) -> None:
    from studio.data.read import MAX_WIDE_BYTES

    path = tmp_path / "huge.txt"
    path.write_bytes(b"\xff\xfe" + _table_text("\t").encode("utf-16-le") * 2000)
    with path.open("r+b") as f:
        f.truncate(MAX_WIDE_BYTES)  # sparse: nothing more is written to disk
    with pytest.raises(DatasetError, match=r"UTF-16 text of 128 MB.*Save it as UTF-8"):
        load_dataset_file(path)


def test_a_utf16_prompt_file_loads_in_chat(tmp_path: Path) -> None:
    """Notepad's "Unicode" .txt, one prompt per line, for Chat's batch comparison."""
    from studio.chat.evaluate import load_prompt_file

    path = tmp_path / "prompts.txt"
    path.write_bytes(b"\xff\xfe" + f"{VI}\r\n\r\n{TH}\r\n".encode("utf-16-le"))
    assert [item.messages for item in load_prompt_file(path)] == [
        [{"role": "user", "content": VI}],
        [{"role": "user", "content": TH}],
    ]


VI_CP1258 = "Tiếng Việt có dấu: người dùng quên mật khẩu"


def _cp1258(text: str) -> bytes:
    """How Vietnamese Windows stores text: a toned letter as its base letter (â, ơ... have
    codes) followed by a combining tone mark, in code page 1258."""
    tones = "\u0300\u0301\u0303\u0309\u0323"  # grave, acute, tilde, hook above, dot below
    out = []
    for ch in text:
        parts = unicodedata.normalize("NFD", ch)
        base = unicodedata.normalize("NFC", "".join(c for c in parts if c not in tones))
        out.append(base + "".join(c for c in parts if c in tones))
    return "".join(out).encode("cp1258")


@pytest.mark.parametrize(
    ("name", "content", "named"),
    [
        (
            "vi.csv",
            b"instruction,output\r\n" + _cp1258(VI_CP1258) + b",ok\r\n",
            "Windows-1258 (Vietnamese)",
        ),
        (
            "vi.jsonl",
            json.dumps(PLAIN_ROW).encode() + b"\n"
            + b'{"instruction": "' + _cp1258(VI_CP1258) + b'", "output": "ok"}\n',
            "Windows-1258 (Vietnamese)",
        ),
        (
            "fr.csv",
            "instruction,output\r\nQu'est-ce qu'un modèle ? Où ça ?,Très bien\r\n".encode("cp1252"),
            "Windows-1252 (Western European)",
        ),
    ],
    ids=["cp1258-csv", "cp1258-jsonl", "cp1252-csv"],
)  # fmt: skip
def test_a_legacy_code_page_is_refused_naming_it(
    tmp_path: Path, name: str, content: bytes, named: str
) -> None:
    """Never a silent misread: the file is refused, the message names the code page it looks
    like and says how to save it as UTF-8."""
    path = tmp_path / name
    path.write_bytes(content)
    assert content.decode("cp1252", errors="replace")  # it would "decode" as something
    with pytest.raises(DatasetError) as info:
        load_dataset_file(path)
    msg = str(info.value)
    assert "not UTF-8" in msg and named in msg and "line 2" in msg
    assert "CSV UTF-8" in msg and len(msg) < 600


# --------------------------------------------------------------------------- CSVs for Excel


def test_the_batch_compare_csv_opens_right_in_excel(tmp_path: Path) -> None:
    from studio.chat.evaluate import CSV_COLUMNS, write_csv

    row = {**dict.fromkeys(CSV_COLUMNS, ""), "prompt": VI, "base": TH, "fine_tuned": "Được ạ"}
    path = write_csv([row], tmp_path)
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")  # the BOM Excel needs to read UTF-8
    with path.open(encoding="utf-8-sig", newline="") as f:
        back = list(csv.DictReader(f))
    assert (back[0]["prompt"], back[0]["base"], back[0]["fine_tuned"]) == (VI, TH, "Được ạ")
    assert write_csv([row], tmp_path) != path  # a second save is a new file


def test_the_shared_csv_writer_round_trips_through_the_dataset_reader(tmp_path: Path) -> None:
    from studio.data.table import write_csv

    rows = [dict(zip(TABLE[0], cells, strict=True)) for cells in TABLE[1:]]
    path = write_csv(tmp_path / "out.csv", list(TABLE[0]), rows)
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert [r["messages"] for r in load_dataset_file(path).rows] == EXPECTED_TABLE_ROWS
    with pytest.raises(FileExistsError):
        write_csv(path, list(TABLE[0]), rows)  # never overwrites


def test_every_csv_the_studio_writes_goes_through_the_one_writer() -> None:
    """A new CSV writer elsewhere would forget the BOM: keep them all in data/table.py."""
    studio = Path(__file__).resolve().parents[1] / "studio"
    writer = re.compile(r"\bcsv\.(writer|DictWriter)\b|\.to_csv\(")
    found = [
        str(f.relative_to(studio))
        for f in studio.rglob("*.py")
        if writer.search(f.read_text(encoding="utf-8"))
    ]
    assert found == ["data/table.py"]


# --------------------------------------------------------------------------- in the browser


@pytest.mark.slow
@pytest.mark.browser
def test_dataset_tab_reads_openai_rows_and_previews_a_weight_0_reply_as_context(
    start_app, page, tmp_path: Path, embedded_model
) -> None:
    """Upload an OpenAI-format file: the counts and notes show, and the preview leaves the
    weight-0 reply unhighlighted (context) while the weight-1 reply is highlighted (trained)."""
    from playwright.sync_api import expect

    path = write_jsonl(tmp_path / "openai-vi.jsonl", [OPENAI_ROW, TOOL_ROWS[0], PLAIN_ROW])
    app = start_app()
    page.goto(app.url)
    page.locator("#dataset-upload input[type=file]").set_input_files(str(path))
    status = page.locator("#dataset-status")
    expect(status).to_contain_text("2 of 3 rows usable", timeout=120_000)
    summary = page.locator("#dataset-summary")
    expect(summary).to_contain_text("1 row calls tools")
    expect(summary).to_contain_text("not supported yet")
    expect(summary).to_contain_text("'name': it is ignored")
    expect(summary).to_contain_text("1 assistant reply has weight 0")

    page.get_by_role("button", name="Show preview", exact=True).click()
    expect(page.locator("#dataset-preview-info")).to_contain_text(
        "1 reply has weight 0", timeout=120_000
    )
    preview = page.locator("#dataset-preview")
    expect(preview).to_contain_text(REPLY_SKIPPED)
    trained = "".join(preview.locator(".token.highlighted .text").all_inner_texts())
    context = "".join(preview.locator(".text.unlabeled").all_inner_texts())
    assert REPLY_TRAINED in trained and REPLY_SKIPPED not in trained
    assert REPLY_SKIPPED in context and VI in context
    assert "Traceback" not in page.content()
