"""Inspect a dataset file the way the Dataset tab shows it, headless: plain data, no gradio.

One call, `inspect_file`, loads and validates a file, keeps a copy of an upload, writes the
mapped copy training reads when the user edited a CSV/Parquet column mapping, scans the valid
rows for PII (caching the scan next to the file training will read, so the Train tab's PII
gate finds it) and measures token lengths. The tab only formats the result.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.data import load as data
from studio.data.read import store_upload
from studio.data.split import write_normalized
from studio.data.table import guess_column_map
from studio.data.tokens import token_lengths
from studio.util import new_path

log = logging.getLogger(__name__)


@dataclass
class Inspection:
    """A loaded file and what training will do with it."""

    report: data.DatasetReport
    source: Path  # the file read (or the stored copy of an upload)
    train_path: Path  # the file training reads: `source`, or the mapped copy
    train_format: str
    scan: Any  # studio.data.pii.PIIReport, or None when the PII check is unavailable
    lengths: list[int]  # tokens per valid row; empty without a tokenizer
    seconds: float

    @property
    def is_sample(self) -> bool:
        """Training reads the bundled sample (the run config then names no dataset)."""
        return self.train_path.resolve() == data.SAMPLE_DATASET

    @property
    def pii_count(self) -> int:
        return len(self.scan.findings) if self.scan is not None else 0


def resolve_user_path(text: str) -> Path:
    """The file a user typed, with a clear DatasetError when it cannot be used."""
    raw = (text or "").strip().strip("'\"")
    if not raw:
        raise data.DatasetError("Enter the path of a dataset file, or upload one.")
    path = Path(raw).expanduser()
    try:
        path = path.resolve()
    except OSError as exc:
        raise data.DatasetError(f"{raw}: not a usable path ({exc}).") from None
    if not path.exists():
        raise data.DatasetError(f"{path} does not exist. Check the path, or upload the file.")
    if path.is_dir():
        raise data.DatasetError(f"{path} is a folder. Enter the path of one dataset file.")
    if not os.access(path, os.R_OK):
        raise data.DatasetError(f"{path} cannot be read (permission denied).")
    return path


def edited_map(report: data.DatasetReport, column_map: dict[str, str | None] | None) -> bool:
    """True when the user's column map differs from the guess training would make."""
    if report.column_map is None or column_map is None or report.columns is None:
        return False
    chosen = {k: v for k, v in column_map.items() if v}
    guess = {k: v for k, v in guess_column_map(report.columns).items() if v}
    return chosen != guess


def write_mapped(report: data.DatasetReport, original: Path) -> Path:
    """The rows as mapped, written to the datasets folder as messages JSONL.

    The run config holds no column map, so training gets exactly the rows shown.
    """
    from studio import paths

    dest = new_path(paths.datasets_dir(), f"{original.stem}.mapped", ".jsonl")
    return write_normalized(report.rows, dest)


def scan_and_cache(report: data.DatasetReport, train_path: Path) -> Any:
    """PII scan of the valid rows, cached with the file training will read (None: no checker)."""
    try:
        from studio.data import pii
    except ImportError as exc:
        log.warning("PII check unavailable: %s", exc)
        return None
    scan = pii.scan_rows(report.rows, report.row_numbers)
    try:
        pii.save_scan(train_path, scan)
    except OSError as exc:  # the cache is a convenience; the result is shown anyway
        log.warning("could not cache the PII scan: %s", exc)
    return scan


class PIICheckError(RuntimeError):
    """The PII scan could not run; a check that did not run must never count as clean."""


def file_pii_count(path: Path, fmt: str = "auto", report: data.DatasetReport | None = None) -> int:
    """Unresolved PII findings in the file at `path`: its cached scan, else a fresh scan.

    The training gate calls this, so a file nobody scanned in the Dataset tab (a run.yaml on
    the command line, a resume, a file edited since) is scanned before it trains, and the
    result is cached for the next time. `report`: the file as the caller already read it
    (a run's one read), scanned instead of reading it again. Raises PIICheckError when the
    scan cannot run.
    """
    try:
        from studio.data import pii
    except ImportError as exc:
        raise PIICheckError(f"the PII checker is not installed ({exc})") from exc
    try:
        cached = pii.unresolved_pii(path)
        if cached is not None:
            return cached
        if report is None:
            report = data.load_dataset_file(path, fmt=fmt)
        scan = pii.scan_rows(report.rows, report.row_numbers)
    except data.DatasetError:
        raise  # an unusable file: the loader's own message, with line numbers
    except Exception as exc:  # never "clean" when the check did not run
        raise PIICheckError(f"could not scan {Path(path).name} for PII: {exc}") from exc
    try:
        pii.save_scan(path, scan)
    except OSError as exc:  # the cache is a convenience; the count stands
        log.warning("could not cache the PII scan: %s", exc)
    return len(scan.findings)


def sample_pii_count() -> int | None:
    """Unresolved PII in the bundled sample, the dataset training uses until another is loaded.

    None when the scan failed: unknown is not 0, and the training gate then scans (and
    refuses) itself.
    """
    try:
        return file_pii_count(data.SAMPLE_DATASET)
    except PIICheckError:
        log.exception("could not scan the bundled sample for PII")
        return None


def inspect_file(
    path: Path,
    fmt: str = "auto",
    column_map: dict[str, str | None] | None = None,
    tokenizer: Any = None,
    json_check: bool = False,
    *,
    keep_copy: bool = False,
) -> Inspection:
    """Load `path` and prepare what training reads; raises DatasetError for an unusable file.

    keep_copy: the file is an upload in a temporary folder, so store a copy to train on.
    """
    t0 = time.perf_counter()
    report = data.load_dataset_file(path, fmt, column_map, tokenizer, json_check)
    source = store_upload(path) if keep_copy else path
    train_path, train_format = Path(source), report.format
    if report.rows and edited_map(report, column_map):
        train_path, train_format = write_mapped(report, path), "messages"
    scan = scan_and_cache(report, train_path)
    lengths = token_lengths(report.rows, tokenizer) if tokenizer is not None else []
    return Inspection(
        report=report,
        source=Path(source),
        train_path=Path(train_path),
        train_format=train_format,
        scan=scan,
        lengths=lengths,
        seconds=time.perf_counter() - t0,
    )
