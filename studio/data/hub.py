"""Datasets by name: a Hugging Face dataset id (or a local dataset folder) into a JSONL file.

`fetch_dataset("tatsu-lab/alpaca", split="train", column_map={"output": "answer"})` loads it
with `datasets.load_dataset`, renames mapped columns to the studio's field names (Alpaca's
instruction/input/output, or messages/conversations), and writes the rows as JSONL under
`<data dir>/datasets/hub/`. That file then goes the local-file route (`studio.data.load`,
the PII scan, the training split), so a dataset by name is validated exactly like a file.

A local folder is either one `datasets.save_to_disk` wrote (a `Dataset`: state.json,
dataset_info.json and *.arrow; a `DatasetDict`: dataset_dict.json and a subfolder per split),
read with `datasets.load_from_disk`, or a folder of data files, read with `load_dataset` as a
hub repo is. `load_dataset` refuses a saved Dataset, and on a saved DatasetDict it only knows
splits named like train/test/validation (others are missed, or pooled into "train").

When the hub cannot be reached the error says so and points to the local-file route, after a
quick connection check rather than `datasets`' minute of retries. With HF_HUB_OFFLINE=1 the
local Hugging Face cache is used as it is.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from studio import compat, paths
from studio.data.read import DatasetError
from studio.util import first_line, short_error

HUB_DIR = "hub"  # under the data dir's datasets/
PROBE_TIMEOUT_S = 3.0
_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SAFE_RE = re.compile(r"[^\w.-]+")
FIELDS = ("instruction", "input", "output", "system", "messages", "conversations")
SAVED_DICT = "dataset_dict.json"  # what DatasetDict.save_to_disk writes at the top
SAVED_ONE = "state.json"  # what Dataset.save_to_disk writes (with dataset_info.json, *.arrow)
FOLDER_KINDS = (
    "a dataset saved with `save_to_disk` (dataset_info.json, state.json and *.arrow files, or"
    " dataset_dict.json with a subfolder per split) or a folder of data files that"
    " `datasets.load_dataset` reads (JSON/JSONL, CSV, Parquet, Arrow, text)"
)


def parse_column_map(text: str | None) -> dict[str, str]:
    """ "output=answer, instruction=question" -> {"output": "answer", ...}; field names are
    the studio's (FIELDS), values the dataset's own column names."""
    out: dict[str, str] = {}
    for part in re.split(r"[,\n]", text or ""):
        if not part.strip():
            continue
        field, sep, column = part.partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not field or not column:
            raise DatasetError(f"Column map entry {part.strip()!r}: write it as field=column.")
        if field not in FIELDS:
            raise DatasetError(f"Column map: {field!r} is not a field; use {', '.join(FIELDS)}.")
        out[field] = column
    return out


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """(reachable, host): one TCP connection to the hub's endpoint (HF_ENDPOINT honoured)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, host
    except OSError:
        return False, host


def offline_message(dataset_id: str, host: str) -> str:
    return (
        f"The Hugging Face Hub ({host}) cannot be reached from this computer, so the dataset"
        f" {dataset_id!r} cannot be downloaded now. Use the local-file route instead: on a"
        " computer with internet, save it as a file (for example `datasets.load_dataset("
        f"{dataset_id!r}, split='train').to_json('train.jsonl')`), copy it here and load it"
        " with Upload or the file path above."
    )


def not_cached_message(dataset_id: str) -> str:
    """Offline mode (HF_HUB_OFFLINE) and a dataset the local cache does not hold."""
    return (
        f"Offline mode is on (HF_HUB_OFFLINE is set) and the dataset {dataset_id!r} is not in"
        " this computer's Hugging Face cache, so it cannot be loaded now. Load it once with"
        " internet and offline mode off (then it is cached), or use the local-file route: save"
        " it as a file (for example `datasets.load_dataset("
        f"{dataset_id!r}, split='train').to_json('train.jsonl')`), copy it here and load it"
        " with Upload or the file path above."
    )


def _load(dataset_id: str, split: str, config: str | None) -> Any:
    """The split of a local dataset folder or a hub id, as a `datasets.Dataset`;
    DatasetError on failure."""
    import datasets

    local = Path(dataset_id).expanduser()
    if local.is_dir() and saved_kind(local):
        return _load_saved(local, split)
    if not local.is_dir():
        if not _ID_RE.match(dataset_id):
            raise DatasetError(
                f"{dataset_id!r} is neither a dataset folder here nor a hub id (owner/name)."
            )
        if not os.environ.get("HF_HUB_OFFLINE"):
            ok, host = hub_reachable()
            if not ok:
                raise DatasetError(offline_message(dataset_id, host))
    try:
        return datasets.load_dataset(
            str(local) if local.is_dir() else dataset_id, config, split=split
        )
    except ValueError as exc:  # e.g. an unknown split: datasets names the ones there are
        raise DatasetError(f"{dataset_id}: {first_line(exc, 400)}") from exc
    except ConnectionError as exc:
        if os.environ.get("HF_HUB_OFFLINE") or "OfflineModeIsEnabled" in str(exc):
            raise DatasetError(not_cached_message(dataset_id)) from exc
        raise DatasetError(offline_message(dataset_id, "the hub")) from exc
    except FileNotFoundError as exc:  # datasets' "no data files" errors derive from it
        if local.is_dir():
            raise DatasetError(
                f"The folder {local} holds no dataset: it is neither {FOLDER_KINDS}. Type the"
                " folder that save_to_disk wrote (for a DatasetDict, the one with"
                " dataset_dict.json), or load a single data file with the file path above."
            ) from exc
        raise _could_not_load(dataset_id, split, exc) from exc
    except Exception as exc:  # not found, gated, private, a broken script
        raise _could_not_load(dataset_id, split, exc) from exc


def _could_not_load(dataset_id: str, split: str, exc: BaseException) -> DatasetError:
    return DatasetError(f"Could not load {dataset_id!r} (split {split!r}): {short_error(exc, 400)}")


def saved_kind(folder: Path) -> str | None:
    """Which `save_to_disk` wrote the folder ("DatasetDict" or "Dataset"), else None."""
    if (folder / SAVED_DICT).is_file():
        return "DatasetDict"
    if (folder / SAVED_ONE).is_file():
        return "Dataset"
    return None


def _load_saved(folder: Path, split: str) -> Any:
    """A folder `save_to_disk` wrote, read with `datasets.load_from_disk`. A DatasetDict gives
    the split asked for (as `load_dataset` does for a hub id); a Dataset is one split already,
    refused only when it recorded another name than the one asked for."""
    import datasets

    kind = saved_kind(folder)
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as exc:  # a half-copied folder: missing arrow files, a broken state.json
        raise DatasetError(
            f"The folder {folder} looks like a {kind} saved with `save_to_disk`, but"
            f" `datasets.load_from_disk` could not read it:"
            f" {short_error(exc, 400)}. Copy the whole folder again, or save the dataset again"
            " with `save_to_disk` (or as a file with `to_json`)."
        ) from exc
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DatasetError(
                f"{folder} (a DatasetDict saved with `save_to_disk`) has no split {split!r};"
                f" its splits are {', '.join(map(repr, ds))}. Type one of them as the split."
            )
        return ds[split]
    recorded = str(ds.split) if ds.split is not None else None
    if recorded is not None and recorded.split("[")[0] != split.split("[")[0]:
        raise DatasetError(
            f"{folder} (a Dataset saved with `save_to_disk`) holds one split, {recorded!r},"
            f" not {split!r}. Type {recorded.split('[')[0]!r} as the split to load it."
        )
    return ds


def _rows(ds: Any, column_map: dict[str, str], max_rows: int | None) -> list[dict[str, Any]]:
    """The dataset's rows with mapped columns renamed to the studio's field names."""
    columns = list(getattr(ds, "column_names", None) or [])
    missing = [c for c in column_map.values() if c not in columns]
    if missing:
        raise DatasetError(
            f"Column map: no column {missing[0]!r} in this dataset (columns: {', '.join(columns)})."
        )
    n = len(ds) if max_rows is None else min(len(ds), max_rows)
    out: list[dict[str, Any]] = []
    for i in range(n):
        row = dict(ds[i])
        renamed = {field: row.pop(col) for field, col in column_map.items()}
        out.append({**row, **renamed})
    return out


def fetch_dataset(
    dataset_id: str,
    split: str = "train",
    column_map: dict[str, str] | None = None,
    *,
    config: str | None = None,
    max_rows: int | None = None,
) -> Path:
    """Load a hub dataset (or a local dataset folder) and write it as JSONL; its path.

    The JSONL is what the Dataset tab then loads, validates and scans like any file.
    """
    dataset_id = (dataset_id or "").strip()
    if not dataset_id:
        raise DatasetError("Type a Hugging Face dataset id (owner/name) or a dataset folder.")
    split = (split or "train").strip()
    ds = _load(dataset_id, split, (config or "").strip() or None)
    rows = _rows(ds, column_map or {}, max_rows)
    if not rows:
        raise DatasetError(f"{dataset_id} (split {split!r}) has no rows.")
    name = Path(dataset_id).name if Path(dataset_id).is_dir() else dataset_id
    safe = _SAFE_RE.sub("_", f"{name}-{split}")
    folder = paths.datasets_dir() / HUB_DIR
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{safe}.jsonl"
    tmp = out.with_suffix(".partial")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    compat.replace(tmp, out)  # a half-written file never shadows a good one
    return out
