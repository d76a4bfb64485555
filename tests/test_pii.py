"""Tests for studio.pii: detection (true positives and look-alikes), masking, redaction,
cleaned copies and the scan cache. Quick: no model, no browser.

Token-shaped test strings are assembled at run time so secret scanners do not flag this file.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest

from studio import paths
from studio.data import pii

HF_TOKEN = "hf_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dE3f"
HF_LETTERS_TOKEN = "hf_" + "xKjQWhGqOTkmFpRZbOySvUvOUIyUuZNaZB"
OPENAI_KEY = "sk-" + "proj-" + "Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56"
OPENAI_OLD_KEY = "sk-" + "T3BlbkFJ" * 6
AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"
GITHUB_TOKEN = "ghp_" + "1a2B3c4D5e6F7g8H9i0J1k2L3m4N5o6P7q8R"
GITHUB_PAT = "github_pat_" + "11ABCDEFG0abcdefghij1234_" + "x9Y8z7W6v5" * 6
KEY_BEGIN = "-----BEGIN " + "RSA PRIVATE KEY-----"
KEY_END = "-----END " + "RSA PRIVATE KEY-----"
PRIVATE_KEY = f"{KEY_BEGIN}\nMIIEowIBAAKCAQEAq7BFUpkGp3+Lq\nA1b2C3d4==\n{KEY_END}"


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("Contact me at mike.smith@example.com.", "email", "mike.smith@example.com"),
        ("Email của tôi: nguyen.van.a@gmail.com nhé", "email", "nguyen.van.a@gmail.com"),
        ("Gọi 0912 345 678 giúp tôi", "phone", "0912 345 678"),
        ("Phone no. 0912.345.678", "phone", "0912.345.678"),
        ("call +84 912345678 now", "phone", "+84 912345678"),
        ("โทร.081-234-5678", "phone", "081-234-5678"),
        ("Thai mobile +66 81 234 5678.", "phone", "+66 81 234 5678"),
        ("US office (415) 555-2671", "phone", "(415) 555-2671"),
        ("US +1 (415) 555-2671", "phone", "+1 (415) 555-2671"),
        ("London 020 7946 0958", "phone", "020 7946 0958"),
        ("UK mobile +44 7911 123456", "phone", "+44 7911 123456"),
        ("card 4242 4242 4242 4242 exp 12/27", "card", "4242 4242 4242 4242"),
        ("card 5555-5555-5555-4444", "card", "5555-5555-5555-4444"),
        ("amex 378282246310005", "card", "378282246310005"),
        ("Thai ID 1-1017-00230-70-8", "th_national_id", "1-1017-00230-70-8"),
        ("เลขบัตร 3100600123450", "th_national_id", "3100600123450"),
        ("Số CCCD: 079203012345", "vn_cccd", "079203012345"),
        ("IBAN DE89 3704 0044 0532 0130 00 please", "iban", "DE89 3704 0044 0532 0130 00"),
        ("pay to GB82WEST12345698765432", "iban", "GB82WEST12345698765432"),
        ("login from 171.244.12.34 today", "ip", "171.244.12.34"),
        ("v6 2001:4860:4860::8888 ok", "ip", "2001:4860:4860::8888"),
        (f"token={HF_TOKEN}", "secret", HF_TOKEN),
        (f"HF_TOKEN={HF_LETTERS_TOKEN}", "secret", HF_LETTERS_TOKEN),
        (f"OPENAI_API_KEY={OPENAI_KEY}", "secret", OPENAI_KEY),
        (f"key {OPENAI_OLD_KEY}", "secret", OPENAI_OLD_KEY),
        (f"aws {AWS_KEY} end", "secret", AWS_KEY),
        (f"gh {GITHUB_TOKEN}", "secret", GITHUB_TOKEN),
        (f"gh {GITHUB_PAT}", "secret", GITHUB_PAT),
        (f"my key:\n{PRIVATE_KEY}\nthanks", "secret", PRIVATE_KEY),
        (
            f"cut off:\n{KEY_BEGIN}\n{'Ab3+' * 16}\n{'x9Z/' * 8}\nthanks a lot",
            "secret",
            f"{KEY_BEGIN}\n{'Ab3+' * 16}\n{'x9Z/' * 8}",
        ),
    ],
)
def test_detects_each_kind(text: str, kind: str, value: str) -> None:
    findings = pii.scan_text(text)
    assert [(f.kind, f.value) for f in findings] == [(kind, value)]
    f = findings[0]
    assert text[f.start : f.end] == value
    assert (f.row, f.where) == (0, "")
    assert f.masked != value


@pytest.mark.parametrize(
    "text",
    [
        "order #123456789 was shipped",
        "Order #123456789 shipped on 2024-05-12",
        "date 2024-05-12",
        "ngày 12/05/2024",
        "on 12.05.2024 at 10:30:45",
        "2024-05-12 10:30",
        "họp lúc 09.12.2023 08.15 và 09-12-2023 08:15",
        "version 1.2.3.4",
        "1.2.3.4",
        "Windows v10.0.19045",
        "Windows 10.0.19045.2965",
        "router 192.168.1.1",
        "host 10.0.0.1",
        "localhost 127.0.0.1",
        "::1 and fe80::1ff:fe23:4567:890a and 2001:db8::1",
        "std::vector<int>",
        "not a card 4242 4242 4242 4241",
        "id 1234567890123456",
        "số 079203012345",
        "079203012345",
        "1101700230705",
        "call 0123 456 789",
        "+1 (123) 456-7890",
        "0000000000",
        "hf_token and hf_hub_download and hf_abc123",
        "sk-learn-is-a-library and sk-2024-05-12-meeting-notes-v2",
        "hf_" + "abcdefghijklmnopqrstuvwxyzabcdefgh",
        "Sort these: 214 96 499 29 0 782 207 51 17 and count 98 99 100 101 102 103",
        "AKIA1234",
        "uuid 550e8400-e29b-41d4-a716-446655440000",
        "sha e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "Giá 25.000.000 đồng, tổng 1,234,567,890",
        "SKU12345678X",
        "user@localhost and name@example and x@example.test",
        "IBAN DE89 3704 0044 0532 0130 01",
    ],
)
def test_look_alikes_are_not_flagged(text: str) -> None:
    assert pii.scan_text(text) == []


def test_thai_text_with_glued_numbers() -> None:
    text = "เบอร์โทร0812345678ค่ะ"
    (f,) = pii.scan_text(text)
    assert (f.kind, f.value, text[f.start : f.end]) == ("phone", "0812345678", "0812345678")

    text = "เลขบัตรประชาชน1101700230708ครับ"
    (f,) = pii.scan_text(text)
    assert (f.kind, f.value) == ("th_national_id", "1101700230708")

    # Thai digits are digits too.
    (f,) = pii.scan_text("ติดต่อ ๐๘๑-๒๓๔-๕๖๗๘ ค่ะ")
    assert (f.kind, f.value) == ("phone", "๐๘๑-๒๓๔-๕๖๗๘")


def test_vietnamese_cccd_needs_a_keyword() -> None:
    with_kw = [
        "Số căn cước công dân của tôi là 079203012345",
        "CMND: 079203012345",
        "so dinh danh ca nhan 079203012345",
        "079203012345 là số CCCD của em",
    ]
    # Vietnamese typed in decomposed form (NFD) still matches the keyword.
    with_kw.append(unicodedata.normalize("NFD", "Số căn cước 079203012345"))
    for text in with_kw:
        assert [(f.kind, f.value) for f in pii.scan_text(text)] == [("vn_cccd", "079203012345")]
    far = "CCCD đã gửi hôm qua, còn đây là mã tra cứu đơn: 079203012345"
    for text in ("Mã giao dịch 079203012345", far):
        assert pii.scan_text(text) == []


def test_several_findings_keep_order_and_offsets() -> None:
    text = "Mail a.b@example.org, call 0912345678 0987654321 or +66 81 234 5678."
    findings = pii.scan_text(text)
    assert [f.kind for f in findings] == ["email", "phone", "phone", "phone"]
    assert all(text[f.start : f.end] == f.value for f in findings)
    assert [f.start for f in findings] == sorted(f.start for f in findings)


def test_masking() -> None:
    def masked(text: str) -> str:
        (f,) = pii.scan_text(text)
        return f.masked

    assert masked("mike@example.com") == "mi***@example.com"
    assert masked("4242 4242 4242 4242") == "**** **** **** 4242"
    assert masked(HF_TOKEN) == "hf_****"
    assert masked(OPENAI_KEY) == "sk-proj-****"
    assert masked(AWS_KEY) == "AKIA****"
    assert masked("0912 345 678") == "**** *** 678"
    assert masked("+84 903 123 456") == "+84 *** *** 456"  # the country code stays visible
    assert masked("171.244.12.34") == "171.*.*.*"
    assert masked("Số CCCD: 079203012345") == "********2345"
    assert masked(PRIVATE_KEY) == KEY_BEGIN + " ****"
    assert masked("DE89 3704 0044 0532 0130 00") == "DE" + "*" * 16 + "3000"
    assert masked("1101700230708") == "*********0708"


def test_redact_text() -> None:
    text = f"Email mike@example.com, gọi 0912 345 678, thẻ 4242424242424242, {HF_TOKEN}."
    assert pii.redact_text(text) == "Email [EMAIL], gọi [PHONE], thẻ [CARD], [SECRET]."
    assert set(pii.PLACEHOLDERS) == set(pii.KINDS)
    # Findings given explicitly are applied; ones that do not match the text are ignored.
    findings = pii.scan_text(text)
    assert pii.redact_text(text, findings[:1]).startswith("Email [EMAIL], gọi 0912 345 678")
    assert pii.redact_text("other text", findings) == "other text"
    assert pii.redact_text("no pii here 2024-05-12") == "no pii here 2024-05-12"


def _rows() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": "Xin chào, tôi cần hỗ trợ."}]},
        {
            "messages": [
                {"role": "system", "content": "Bạn là trợ lý."},
                {"role": "user", "content": "Email tôi: lan.nguyen@gmail.com, SĐT 0912 345 678"},
                {"role": "assistant", "content": '{"answer": "Đã ghi nhận"}'},
            ]
        },
        {"messages": [{"role": "user", "content": "ราคา 1,500 บาท ส่งวันที่ 12/05/2024"}]},
        {"messages": [{"role": "user", "content": f"เบอร์โทร0812345678ค่ะ {HF_TOKEN}"}]},
    ]


def test_scan_rows_report_and_json_round_trip() -> None:
    rows = _rows()
    report = pii.scan_rows(rows, row_numbers=[3, 5, 8, 9])
    assert report.total_rows == 4
    assert report.rows_with_pii == [5, 9]
    assert report.counts == {"email": 1, "phone": 2, "secret": 1}
    assert [(f.row, f.where, f.kind) for f in report.findings] == [
        (5, "messages[1].content", "email"),
        (5, "messages[1].content", "phone"),
        (9, "messages[0].content", "phone"),
        (9, "messages[0].content", "secret"),
    ]
    assert report.table()[0] == {
        "row": 5,
        "where": "messages[1].content",
        "kind": "email",
        "masked": "la***@gmail.com",
    }
    assert all("value" not in r for r in report.table())
    data = json.loads(json.dumps(report.to_dict()))
    assert pii.PIIReport.from_dict(data) == report
    # Without row numbers rows count from 1; malformed rows are skipped, not fatal.
    report = pii.scan_rows([*rows, {"messages": None}, "junk", {"messages": [{"content": 5}]}])
    assert (report.rows_with_pii, report.total_rows) == ([2, 4], 7)
    # Multi-part content: the text parts are scanned and redacted.
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a@gmail.com"}]}]}
    (f,) = pii.scan_rows([parts]).findings
    assert (f.row, f.where, f.kind) == (1, "messages[0].content[0].text", "email")
    assert pii.redact_rows([parts])[0]["messages"][0]["content"][0]["text"] == "[EMAIL]"


def test_redact_and_drop_rows_leave_inputs_unchanged() -> None:
    rows = _rows()
    before = json.dumps(rows, ensure_ascii=False)
    redacted = pii.redact_rows(rows)
    assert json.dumps(rows, ensure_ascii=False) == before
    assert redacted[1]["messages"][1]["content"] == "Email tôi: [EMAIL], SĐT [PHONE]"
    assert redacted[3]["messages"][0]["content"] == "เบอร์โทร[PHONE]ค่ะ [SECRET]"
    assert redacted[0] == rows[0] and redacted[0] is not rows[0]
    assert pii.scan_rows(redacted).findings == []

    numbers = [10, 11, 12, 13]
    report = pii.scan_rows(rows, numbers)
    kept = pii.drop_rows(rows, report, numbers)
    assert kept == [rows[0], rows[2]]
    assert json.dumps(rows, ensure_ascii=False) == before


@pytest.fixture
def source_file(studio_home: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tickets.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for row in _rows():
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def test_write_cleaned_redact_makes_a_new_file(source_file: Path) -> None:
    original = source_file.read_bytes()
    rows = [json.loads(line) for line in original.decode("utf-8").splitlines()]
    first = pii.write_cleaned(rows, source_file, "redact")
    second = pii.write_cleaned(rows, source_file, "redact")

    assert source_file.read_bytes() == original
    assert first.path.parent == paths.datasets_dir() == second.path.parent
    assert re.fullmatch(r"tickets\.redacted-\d{8}-\d{6}(-\d+)?\.jsonl", first.path.name)
    assert first.path != second.path and first.path.exists() and second.path.exists()
    assert (first.rows_written, first.findings_fixed) == (4, 4)

    text = first.path.read_text(encoding="utf-8")
    assert "lan.nguyen" not in text and HF_TOKEN not in text and "0812345678" not in text
    assert "Email tôi: [EMAIL], SĐT [PHONE]" in text  # UTF-8, not \\u escapes
    written = [json.loads(line) for line in text.splitlines()]
    assert written == pii.redact_rows(rows)
    # The cleaned copy counts as scanned and clean; the source is still unscanned.
    assert pii.unresolved_pii(first.path) == 0
    assert pii.unresolved_pii(source_file) is None


def test_write_cleaned_drop(source_file: Path) -> None:
    rows = [json.loads(line) for line in source_file.read_text(encoding="utf-8").splitlines()]
    result = pii.write_cleaned(rows, source_file, "drop")
    assert re.fullmatch(r"tickets\.dropped-\d{8}-\d{6}(-\d+)?\.jsonl", result.path.name)
    written = [json.loads(line) for line in result.path.read_text("utf-8").splitlines()]
    assert written == [rows[0], rows[2]]
    assert (result.rows_written, result.findings_fixed) == (2, 4)
    assert pii.unresolved_pii(result.path) == 0
    with pytest.raises(ValueError, match="action"):
        pii.write_cleaned(rows, source_file, "delete")


def test_scan_cache_round_trip(source_file: Path) -> None:
    assert pii.load_scan(source_file) is None
    assert pii.unresolved_pii(source_file) is None
    rows = [json.loads(line) for line in source_file.read_text(encoding="utf-8").splitlines()]
    report = pii.scan_rows(rows)
    cache = pii.save_scan(source_file, report)
    assert cache == paths.datasets_dir() / "scans" / f"{pii.file_sha256(source_file)}.json"
    assert HF_TOKEN not in cache.read_text(encoding="utf-8")  # the cache holds no raw PII

    loaded = pii.load_scan(source_file)
    assert loaded is not None
    assert loaded.counts == report.counts and loaded.rows_with_pii == report.rows_with_pii
    assert [f.masked for f in loaded.findings] == [f.masked for f in report.findings]
    assert {f.value for f in loaded.findings} == {""}
    assert pii.unresolved_pii(source_file) == 4

    # The cache follows content: an edited file is unscanned again, a copy is not.
    copy = source_file.with_name("copy.jsonl")
    copy.write_bytes(source_file.read_bytes())
    assert pii.unresolved_pii(copy) == 4
    with source_file.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert pii.unresolved_pii(source_file) is None
    assert pii.unresolved_pii(source_file.with_name("missing.jsonl")) is None
