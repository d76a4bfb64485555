"""Unicode the way Vietnamese and Thai users write it (issue 16): run names, JSONL line breaks,
internationalised email addresses, and search. Quick: no model, no browser.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from studio import runs
from studio.config import ConfigError, RunConfig
from studio.data import pii
from studio.data.load import load_dataset_file
from studio.data.search import search_rows

# Characters that str.splitlines() treats as line breaks but JSON Lines does not.
LINE_BREAKS_INSIDE_TEXT = ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


def chat(user: str, assistant: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    }


# --------------------------------------------------------------------------- run names


@pytest.mark.parametrize(
    "name",
    [
        "สวัสดี",  # Thai with vowel marks (combining, category Mn)
        "ภาษาไทย-ครั้งที่๒",
        unicodedata.normalize("NFD", "Tiếng-Việt_thử.nghiệm"),  # typed decomposed
        "Tiếng-Việt",
        "日本語-run",
        "हिन्दी",  # Devanagari with a virama and vowel signs (Mn, Mc)
    ],
)
def test_run_names_accept_letters_and_marks_of_every_script(name: str) -> None:
    cfg = RunConfig(run_name=name).validate()
    assert cfg.run_name == unicodedata.normalize("NFC", name)


def test_nfd_and_nfc_names_give_the_same_run_folder(tmp_path: Path) -> None:
    nfd = unicodedata.normalize("NFD", "Nguyễn")
    cfg = RunConfig(run_name=nfd).validate()
    assert cfg.run_name == "Nguyễn" and unicodedata.is_normalized("NFC", cfg.run_name)
    folder = runs.new_run_dir(nfd, root=tmp_path)
    assert folder.name.startswith("Nguyễn-") and unicodedata.is_normalized("NFC", folder.name)


@pytest.mark.parametrize(
    "name", ["", "a b", "a/b", "a\\b", "run\n", "x" * 65, "a:b", "\u0301", "tab\there", "a\u200bb"]
)
def test_run_names_still_refuse_separators_and_spaces(name: str) -> None:
    with pytest.raises(ConfigError, match="run_name"):
        RunConfig(run_name=name).validate()


def test_a_40_letter_thai_name_counts_composed_characters() -> None:
    name = "ก" * 39 + "ี"  # 40 code points: a mark is part of the name's length, as before
    assert RunConfig(run_name=name).validate().run_name == name


# --------------------------------------------------------------------------- JSONL line breaks


@pytest.mark.parametrize("sep", LINE_BREAKS_INSIDE_TEXT)
def test_dataset_jsonl_keeps_rows_with_unicode_line_separators(tmp_path: Path, sep: str) -> None:
    rows = [chat(f"a{sep}b", "c"), chat("d", f"e{sep}")]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    report = load_dataset_file(path)
    assert report.valid == 2 and not report.errors
    assert report.rows[0]["messages"][0]["content"] == f"a{sep}b"


@pytest.mark.parametrize("sep", LINE_BREAKS_INSIDE_TEXT)
def test_run_log_keeps_entries_with_unicode_line_separators(tmp_path: Path, sep: str) -> None:
    with runs.open_log(tmp_path) as fh:
        runs.append_log(fh, {"step": 1, "loss": 2.0})
        runs.append_log(fh, {"event": "note", "message": f"Tiếng Việt{sep}ภาษาไทย"})
        runs.append_log(fh, {"step": 2, "loss": 1.5})
    entries = runs.load_log(tmp_path)
    assert [e.get("step") for e in entries] == [1, None, 2]
    assert entries[1]["message"] == f"Tiếng Việt{sep}ภาษาไทย"


def test_run_log_still_skips_a_torn_last_line(tmp_path: Path) -> None:
    (tmp_path / runs.LOG).write_text('{"step": 1}\r\n{"step": 2}\n{"step": 3, "lo', "utf-8")
    assert [e["step"] for e in runs.load_log(tmp_path)] == [1, 2]


def test_blind_votes_with_unicode_line_separators_are_counted(tmp_path: Path) -> None:
    from studio.chat.evaluate import VOTES_FILE, blind_tally

    votes = [{"winner": "tuned", "prompt": f"Tiếng Việt{sep}ภาษาไทย"} for sep in ("\u2028", "\x85")]
    votes.append({"winner": "base", "prompt": "plain"})
    lines = [json.dumps(v, ensure_ascii=False) for v in votes]
    (tmp_path / VOTES_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    tally = blind_tally(tmp_path)
    assert (tally["total"], tally["tuned_wins"], tally["base_wins"]) == (3, 2, 1)


def test_csv_header_with_a_unicode_line_separator_in_a_cell(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"a\u2028b",c\n', encoding="utf-8")
    report = load_dataset_file(path)
    assert report.valid == 1
    assert report.rows[0]["messages"][0]["content"] == "a\u2028b"


# --------------------------------------------------------------------------- emails


@pytest.mark.parametrize(
    "address",
    [
        "nguyễn.văn@gmail.com",
        "Đặng.Thị@congty.vn",
        "trần_thị.bích@yahoo.com.vn",
        unicodedata.normalize("NFD", "nguyễn.văn@gmail.com"),
        "สมชาย@example.co.th",
        "почта@example.ru",
    ],
)
def test_international_local_parts_are_matched_whole(address: str) -> None:
    text = f"Liên hệ {address} nhé"
    found = pii.scan_text(text)
    assert [(f.kind, f.value) for f in found] == [("email", address)]
    assert pii.redact_text(text) == "Liên hệ [EMAIL] nhé"


def test_email_after_glued_text_of_another_script_starts_at_the_address() -> None:
    # Thai is written without spaces: Thai text glued to a Latin address is not part of it.
    found = pii.scan_text("ติดต่อsomchai.k@gmail.comค่ะ")
    assert [(f.kind, f.value) for f in found] == [("email", "somchai.k@gmail.com")]


def test_email_local_part_does_not_swallow_punctuation_before_it() -> None:
    found = pii.scan_text("Email:(nguyễn.văn@gmail.com)")
    assert [f.value for f in found] == ["nguyễn.văn@gmail.com"]


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize("query", ["²", "①", "½", "٣", "๒"])
def test_search_for_digit_like_characters_does_not_raise(query: str) -> None:
    found = search_rows([chat(f"x{query}", "y")], [1], query)
    assert found["matches"] == 1


def test_search_by_line_number_with_thai_digits() -> None:
    rows = [chat("a", "b")]
    assert search_rows(rows, [2], "๒")["matches"] == 1
    assert search_rows(rows, [2], "2")["matches"] == 1
