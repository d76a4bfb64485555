"""The Dataset tab in a real browser: the bundled sample, a redaction, and a garbage upload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from studio.data import load as data
from studio.data import pii, scan
from studio.data.split import split_sizes

TIMEOUT_MS = 120_000


def test_inspect_the_sample_caches_its_pii_scan(studio_home: Path) -> None:
    """The Dataset tab's engine work runs headless: load, scan, cache for the Train tab."""
    ins = scan.inspect_file(data.SAMPLE_DATASET)
    assert ins.is_sample and ins.train_path == data.SAMPLE_DATASET
    assert ins.report.valid > 0 and ins.lengths == []  # no tokenizer: no lengths
    assert ins.pii_count == len(ins.scan.findings) > 0
    assert pii.unresolved_pii(data.SAMPLE_DATASET) == ins.pii_count
    assert scan.sample_pii_count() == ins.pii_count


def test_an_edited_column_map_writes_the_rows_training_reads(
    studio_home: Path, tmp_path: Path
) -> None:
    table = tmp_path / "qa.csv"
    table.write_text(
        "instruction,output,notes\nSay hi,Hello,greeting\nSay bye,Goodbye,farewell\n",
        encoding="utf-8",
    )
    guessed = scan.inspect_file(table)
    assert guessed.train_path == table and not scan.edited_map(guessed.report, None)
    edited = {"instruction": "instruction", "input": "notes", "output": "output", "system": None}
    ins = scan.inspect_file(table, column_map=edited)
    assert ins.train_format == "messages" and ins.train_path.parent == studio_home / "datasets"
    assert ".mapped-" in ins.train_path.name and ins.source == table  # the original stays
    again = data.load_dataset_file(ins.train_path)
    assert [r["messages"] for r in again.rows] == [r["messages"] for r in ins.report.rows]
    assert "greeting" in ins.train_path.read_text(encoding="utf-8")
    assert pii.unresolved_pii(ins.train_path) == 0


def test_a_path_typed_by_the_user_is_checked(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError, match="does not exist"):
        scan.resolve_user_path(str(tmp_path / "nope.jsonl"))
    with pytest.raises(data.DatasetError, match="is a folder"):
        scan.resolve_user_path(f"'{tmp_path}'")
    with pytest.raises(data.DatasetError, match="Enter the path"):
        scan.resolve_user_path("  ")


@pytest.mark.slow
@pytest.mark.browser
def test_dataset_tab_sample_redact_and_garbage(
    start_app, page, tmp_path: Path, embedded_model
) -> None:
    from playwright.sync_api import expect

    expected = data.load_dataset_file(data.SAMPLE_DATASET)
    scan = pii.scan_rows(expected.rows, expected.row_numbers)
    assert scan.findings, "the sample is meant to carry planted PII"
    sample_sha = pii.file_sha256(data.SAMPLE_DATASET)

    app = start_app()
    page.goto(app.url)
    status = page.locator("#dataset-status")
    page.get_by_role("button", name="Load the bundled sample", exact=True).click()
    expect(status).to_contain_text(
        f"{expected.valid} of {expected.total} rows usable", timeout=TIMEOUT_MS
    )
    summary = page.locator("#dataset-summary")
    expect(summary).to_contain_text("messages (JSONL)")
    expect(summary).to_contain_text(f"{expected.duplicate_rows} (lines")
    n_train, n_val = split_sizes(expected.valid)
    expect(summary).to_contain_text(f"{n_train} / {n_val} (seed 42")
    expect(page.locator("#dataset-tokens")).to_contain_text("p50")
    pii_md = page.locator("#dataset-pii")
    expect(pii_md).to_contain_text(f"{len(scan.findings)} possible PII findings")
    table = page.locator("#dataset-pii-table")
    expect(table).to_contain_text(scan.findings[0].masked)

    page.get_by_role("button", name="Redact into a cleaned copy", exact=True).click()
    clean = page.locator("#dataset-clean")
    expect(clean).to_contain_text("Cleaned copy written", timeout=TIMEOUT_MS)
    expect(pii_md).to_contain_text("No PII found")
    cleaned = Path(clean.locator("code").first.inner_text())
    assert cleaned.is_file() and cleaned.parent == Path(os.environ["LORA_STUDIO_HOME"]) / "datasets"
    assert "[EMAIL]" in cleaned.read_text(encoding="utf-8")
    assert pii.file_sha256(data.SAMPLE_DATASET) == sample_sha  # the original is untouched

    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(bytes(range(256)) * 64)
    page.locator("#dataset-upload input[type=file]").set_input_files(str(garbage))
    expect(status).to_contain_text("Could not load garbage.jsonl", timeout=TIMEOUT_MS)
    expect(status).to_contain_text("binary file")
    assert "Traceback" not in page.content()

    page.get_by_label("…or the path of a file on this computer").fill(str(tmp_path / "nope.csv"))
    page.get_by_role("button", name="Load file", exact=True).click()
    expect(status).to_contain_text("does not exist", timeout=TIMEOUT_MS)
    # The last good dataset stays loaded and the app keeps answering.
    expect(summary).to_contain_text(cleaned.name)


@pytest.mark.slow
@pytest.mark.browser
def test_hub_dataset_offline_names_the_cause_and_a_local_dataset_folder_loads(
    start_app, page, studio_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Dataset tab's "Hugging Face dataset by name" input, offline (HF_HUB_OFFLINE): a
    dataset id the local cache lacks gets a message naming offline mode and the local-file
    route; a local dataset folder (read by `datasets.load_dataset` as a hub repo is) loads,
    with its column map, through the same validation and PII scan as a file."""
    import json

    from playwright.sync_api import expect

    folder = tmp_path / "support-vi"
    (folder / "data").mkdir(parents=True)
    rows = [{"question": f"Đơn {i} chưa tới?", "answer": f"Kiểm tra đơn {i}."} for i in range(5)]
    rows[3]["answer"] = "Gọi cho tôi: 0912 345 678"  # one phone number for the PII scan
    with (folder / "data" / "train.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the app inherits it: no network is tried
    app = start_app()
    page.goto(app.url)
    page.get_by_text("…or a Hugging Face dataset by name").click()
    status = page.locator("#dataset-status")
    hub_id = page.locator("#dataset-hub-id textarea, #dataset-hub-id input").first
    hub_id.fill("lora-studio-tests/never-cached")
    page.locator("#dataset-hub-load").click()
    expect(status).to_contain_text("Could not load", timeout=TIMEOUT_MS)
    expect(status).to_contain_text("Offline mode is on (HF_HUB_OFFLINE is set)")
    expect(status).to_contain_text("not in this computer's Hugging Face cache")
    expect(status).to_contain_text("local-file route")
    assert "Traceback" not in page.content()

    hub_id.fill(str(folder))
    page.get_by_label("Column map (field=column, ...)").fill("instruction=question, output=answer")
    page.locator("#dataset-hub-load").click()
    expect(status).to_contain_text("5 of 5 rows usable", timeout=TIMEOUT_MS)
    written = studio_home / "datasets" / "hub" / "support-vi-train.jsonl"
    expect(status).to_contain_text(str(written))
    assert json.loads(written.read_text(encoding="utf-8").splitlines()[0]) == {
        "instruction": "Đơn 0 chưa tới?",
        "output": "Kiểm tra đơn 0.",
    }
    expect(page.locator("#dataset-summary")).to_contain_text("alpaca")
    expect(page.locator("#dataset-pii")).to_contain_text("1 possible PII finding")
