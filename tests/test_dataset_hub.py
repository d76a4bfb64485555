"""Datasets saved with `datasets` `save_to_disk`, loaded as the Dataset tab loads a dataset by
name: `hub.fetch_dataset` (the folder -> a JSONL copy) then `scan.inspect_file` (row
validation, column map, PII scan). Quick: no model, no network."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from studio.data import hub
from studio.data import scan as ds_scan


def support_rows(n: int, tag: str) -> list[dict[str, Any]]:
    """Question/answer rows (not the studio's field names: the column map renames them)."""
    return [
        {"question": f"{tag} {i}: đơn chưa tới?", "answer": f"{tag} {i}: đã kiểm tra."}
        for i in range(n)
    ]


def load_like_the_tab(folder: Path, split: str, column_map: dict[str, str]) -> ds_scan.Inspection:
    """What the Dataset tab's "Load from the hub" does with a folder, without the UI."""
    return ds_scan.inspect_file(hub.fetch_dataset(str(folder), split, column_map))


QA_MAP = {"instruction": "question", "output": "answer"}


def test_a_dataset_saved_with_save_to_disk_loads_validated_and_scanned(
    studio_home: Path, tmp_path: Path
) -> None:
    import datasets

    rows = support_rows(5, "train")
    rows[1]["answer"] = "Gọi cho tôi: 0912 345 678"  # a phone number the PII scan must find
    rows[3]["question"] = ""  # an empty instruction: row validation must reject it
    folder = tmp_path / "saved-one"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    assert hub.saved_kind(folder) == "Dataset"

    ins = load_like_the_tab(folder, "train", QA_MAP)
    assert ins.source.parent == studio_home / "datasets" / hub.HUB_DIR
    assert ins.report.format == "alpaca"
    assert (ins.report.total, ins.report.valid, len(ins.report.errors)) == (5, 4, 1)
    got = [r["messages"][0]["content"] for r in ins.report.rows]
    assert got == [rows[i]["question"] for i in (0, 1, 2, 4)]
    assert ins.scan is not None and len(ins.scan.rows_with_pii) == 1


def test_a_saved_datasetdict_gives_the_split_asked_for_and_only_it(
    studio_home: Path, tmp_path: Path
) -> None:
    """A split not named like train/test/validation, which `load_dataset` does not see."""
    import datasets

    folder = tmp_path / "saved-dict"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(support_rows(4, "train")),
            "holdout": datasets.Dataset.from_list(support_rows(2, "holdout")),
        }
    ).save_to_disk(str(folder))
    assert hub.saved_kind(folder) == "DatasetDict"

    train = load_like_the_tab(folder, "train", QA_MAP)
    assert train.source.name == "saved-dict-train.jsonl"
    questions = [r["messages"][0]["content"] for r in train.report.rows]
    assert questions == [f"train {i}: đơn chưa tới?" for i in range(4)]

    holdout = load_like_the_tab(folder, "holdout", QA_MAP)
    questions = [r["messages"][0]["content"] for r in holdout.report.rows]
    assert questions == [f"holdout {i}: đơn chưa tới?" for i in range(2)]

    with pytest.raises(hub.DatasetError, match=r"no split 'test'.*'train', 'holdout'"):
        hub.fetch_dataset(str(folder), "test", QA_MAP)


def test_a_saved_dataset_of_another_split_names_the_split_to_type(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "saved-validation"
    ds = datasets.Dataset.from_list(support_rows(2, "v"), split=datasets.Split.VALIDATION)
    ds.save_to_disk(str(folder))
    with pytest.raises(hub.DatasetError, match=r"holds one split, 'validation'.*Type 'validation'"):
        hub.fetch_dataset(str(folder), "train", QA_MAP)
    path = hub.fetch_dataset(str(folder), "validation", QA_MAP)
    assert [
        json.loads(line)["output"] for line in path.read_text(encoding="utf-8").splitlines()
    ] == [
        "v 0: đã kiểm tra.",
        "v 1: đã kiểm tra.",
    ]


def test_a_folder_that_is_no_dataset_says_what_where_and_what_to_do(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-dataset"
    empty.mkdir()
    with pytest.raises(hub.DatasetError) as info:
        hub.fetch_dataset(str(empty), "train")
    message = str(info.value)
    assert str(empty) in message and "holds no dataset" in message
    assert "save_to_disk" in message and "load_dataset" in message and "file path" in message


def test_a_half_copied_saved_dataset_is_a_clear_error(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "half"
    datasets.Dataset.from_list(support_rows(2, "h")).save_to_disk(str(folder))
    for arrow in folder.glob("*.arrow"):
        arrow.unlink()
    with pytest.raises(hub.DatasetError, match=r"looks like a Dataset saved with `save_to_disk`"):
        hub.fetch_dataset(str(folder), "train")
