"""Downloading a model from the Hugging Face hub: bytes, speed and ETA, Cancel, resume.

`huggingface_hub` does the transfer (its HTTP GET with retries, its cache layout, its token);
this module adds what a user watching a 16 GB download needs: a disk-space check with the
size from the hub's metadata before the first byte, progress in bytes (the library's own
progress counts files), Cancel, a partial file kept for the next try (huggingface_hub 2.4
deletes its own), and failures that name their cause and the next step.
The UI (Hardware tab) and `python -m studio.models NAME` both call `download`.

The hub is whatever `HF_ENDPOINT` names when huggingface_hub is first imported (the tests
stand one in on 127.0.0.1: tests/hub_server.py).
"""

from __future__ import annotations

import errno
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The files a model needs (weights, config, tokenizer, chat template); not the .bin/.pth
# duplicates, ONNX exports or GGUFs some repositories also hold.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# A download must leave this much of the disk free (the OS and the run folders need room).
DISK_SPARE_BYTES = 200 * 10**6
_REPORT_EVERY_S = 0.25
# huggingface_hub reads and reports 10 MiB at a time: on home broadband that is a progress
# step (and a Cancel check) every few seconds. 1 MiB costs nothing measurable.
CHUNK_BYTES = 2**20
_SPEED_WINDOW_S = 5.0
CAUSES = ("offline", "not_found", "gated", "disk_full", "cancelled", "failed")


class HubError(RuntimeError):
    """A download that did not happen; `cause` is one of CAUSES, the message says what to do."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass
class DownloadProgress:
    """Where a download stands: bytes of this model, speed over the last seconds, ETA."""

    repo_id: str
    done_bytes: int
    total_bytes: int
    speed_bps: float = 0.0
    finished: bool = False

    @property
    def fraction(self) -> float:
        return min(1.0, self.done_bytes / self.total_bytes) if self.total_bytes else 1.0

    @property
    def eta_s(self) -> float | None:
        if self.finished or self.speed_bps <= 0:
            return None
        return max(0, self.total_bytes - self.done_bytes) / self.speed_bps

    def line(self) -> str:
        """`[ 42%] 412.3 MB of 988.1 MB · 5.2 MB/s · 1 min 50 s left` (the CLI prints it)."""
        text = f"[{self.fraction:4.0%}] {mb(self.done_bytes)} of {mb(self.total_bytes)}"
        if self.finished:
            return text + " · done"
        if self.speed_bps > 0:
            text += f" · {mb(self.speed_bps)}/s"
        eta = self.eta_s
        return text + (f" · {duration(eta)} left" if eta is not None else " · starting")


@dataclass
class DownloadPlan:
    """What a download will fetch, from the hub's metadata (before any byte of weights)."""

    repo_id: str
    commit: str
    files: dict[str, int]  # repo path -> size in bytes, for the files still to fetch
    cached_bytes: int  # the files already complete in the cache
    partial_bytes: int  # bytes of interrupted files that the download resumes from
    cache_dir: Path
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    @property
    def needed_bytes(self) -> int:
        return max(0, self.total_bytes - self.partial_bytes)


def mb(n: float) -> str:
    return f"{n / 10**9:.2f} GB" if n >= 10**9 else f"{n / 10**6:.1f} MB"


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"


def gated_steps(repo_id: str) -> str:
    """What to do for a gated or private model; the same steps in the UI, CLI and README."""
    from huggingface_hub import constants

    return (
        f"{repo_id} is gated: the hub lets you download it once you accept its licence.\n"
        f"1. Open {constants.ENDPOINT}/{repo_id} while logged in and accept the licence"
        " (for Llama and Gemma the approval can take a few minutes to hours).\n"
        f"2. Create a read token at {constants.ENDPOINT}/settings/tokens.\n"
        "3. Paste it into the studio's Hugging Face token field (Hardware tab), or run"
        " `hf auth login` in a terminal.\n"
        "4. Download again."
    )


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _classify(exc: BaseException, repo_id: str) -> HubError:
    """Turn the client's exception into a cause and a sentence a user can act on.

    The dry run wraps the hub's answer (gated, not found) in a DryRunError: the cause is
    found down the exception chain."""
    for link in _chain(exc):
        found = _classify_one(link, repo_id)
        if found is not None:
            return found
    if _is_offline(exc):
        return HubError(
            "offline",
            f"Cannot reach the hub for {repo_id} ({_first_line(exc)}). Check the internet"
            " connection (or a proxy), then download again: finished files are kept and"
            " a half-done file continues where it stopped.",
        )
    return HubError("failed", f"Download of {repo_id} failed: {_first_line(exc)}")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in seen:
        seen.append(link)
        link = link.__cause__ or link.__context__
    return seen


def _classify_one(exc: BaseException, repo_id: str) -> HubError | None:
    from huggingface_hub import errors

    if isinstance(exc, HubError):
        return exc
    if isinstance(exc, errors.GatedRepoError):
        return HubError("gated", gated_steps(repo_id))
    if isinstance(exc, errors.RepositoryNotFoundError):
        return HubError(
            "not_found",
            f"{repo_id} is not on the hub (check the spelling: owner/name). If it is a private"
            " repository, log in with a token that can read it (Hardware tab's token field or"
            " `hf auth login`).",
        )
    if isinstance(exc, errors.RevisionNotFoundError | errors.EntryNotFoundError):
        return HubError("not_found", f"{repo_id}: {_first_line(exc)}")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, errors.HfHubHTTPError) and status in (401, 403):
        return HubError("gated", gated_steps(repo_id))
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return HubError(
            "disk_full",
            f"The disk filled up while downloading {repo_id}: free some space (the partial"
            f" files in {cache_dir()} are kept) and download again to continue.",
        )
    return None


def _is_offline(exc: BaseException) -> bool:
    from huggingface_hub import errors

    names = {"ConnectError", "TimeoutException", "ConnectTimeout", "ReadTimeout", "ReadError"}
    names |= {"RemoteProtocolError", "NetworkError", "DryRunError"}
    for link in _chain(exc):
        if isinstance(link, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
            return True
        if any(t.__name__ in names for t in type(link).__mro__):
            return True
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def plan_download(repo_id: str, *, token: str | None = None) -> DownloadPlan:
    """The hub's file list and sizes for `repo_id` (a dry run: no weights are fetched)."""
    from huggingface_hub import snapshot_download

    try:
        infos = snapshot_download(
            repo_id, allow_patterns=MODEL_FILES, dry_run=True, token=token, max_workers=4
        )
    except Exception as exc:
        raise _classify(exc, repo_id) from exc
    commit = infos[0].commit_hash if infos else ""
    todo = {i.filename: int(i.file_size or 0) for i in infos if i.will_download}
    cached = sum(int(i.file_size or 0) for i in infos if not i.will_download)
    return DownloadPlan(repo_id, commit, todo, cached, _partial_bytes(repo_id), cache_dir())


def _partial_bytes(repo_id: str) -> int:
    """Bytes already in this repo's `.incomplete` files (an interrupted download)."""
    from huggingface_hub.file_download import repo_folder_name

    blobs = cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    return sum(p.stat().st_size for p in blobs.glob("*.incomplete")) if blobs.is_dir() else 0


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds `folder` (or would, once created)."""
    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_disk(plan: DownloadPlan, free: int | None = None) -> None:
    """Refuse before the first byte when the download would not fit on the disk."""
    free = free_bytes(plan.cache_dir) if free is None else free
    if plan.needed_bytes + DISK_SPARE_BYTES <= free:
        return
    raise HubError(
        "disk_full",
        f"Not enough disk space for {plan.repo_id}: it needs {mb(plan.needed_bytes)} and"
        f" {mb(free)} is free on the disk of {plan.cache_dir} (keeping {mb(DISK_SPARE_BYTES)}"
        " spare). Free some space, or point HF_HOME (or HF_HUB_CACHE) at a larger disk"
        " before starting the studio; nothing was downloaded.",
    )


class _Meter:
    """Counts the bytes huggingface_hub reports and turns them into DownloadProgress."""

    def __init__(self, repo_id: str, total: int, report: Callable[[DownloadProgress], None]):
        self.repo_id, self.total, self.report = repo_id, total, report
        self.done = 0
        self.samples: list[tuple[float, int]] = []
        self.last_report = 0.0
        self.lock = threading.Lock()

    def add(self, n: int, cancel: threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise HubError("cancelled", cancelled_message(self.repo_id))
        now = time.monotonic()
        with self.lock:
            self.done += int(n)
            self.samples.append((now, self.done))
            while self.samples and now - self.samples[0][0] > _SPEED_WINDOW_S:
                self.samples.pop(0)
            if now - self.last_report < _REPORT_EVERY_S:
                return
            self.last_report = now
            snapshot = self.snapshot()
        self.report(snapshot)

    def snapshot(self, finished: bool = False) -> DownloadProgress:
        speed = 0.0
        if len(self.samples) >= 2:
            (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
            speed = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
        done = self.total if finished else min(self.done, self.total)
        return DownloadProgress(self.repo_id, done, self.total, speed, finished)


def cancelled_message(repo_id: str) -> str:
    return (
        f"Download of {repo_id} cancelled. The part already downloaded is kept in"
        f" {cache_dir()}: download it again to continue from there."
    )


def _bar_class(meter: _Meter, cancel: threading.Event | None) -> type:
    """A progress-bar class for huggingface_hub's `http_get`: it feeds the meter and checks
    Cancel (raising from `update` stops the transfer between two chunks)."""

    class _Bar:
        def __init__(self, *_args: Any, **kwargs: Any) -> None:
            self.n = 0
            self.total = kwargs.get("total")  # a resumed file's bytes: in the meter's start

        def __enter__(self) -> _Bar:
            return self

        def __exit__(self, *_exc: object) -> None:
            pass

        def update(self, n: float | None = 1) -> None:
            self.n += int(n or 0)
            meter.add(int(n or 0), cancel)

        def close(self) -> None:
            pass

        def refresh(self) -> None:
            pass

    return _Bar


def download(
    repo_id: str,
    *,
    progress: Callable[[DownloadProgress], None] | None = None,
    cancel: threading.Event | None = None,
    token: str | None = None,
) -> Path:
    """Fetch a model into the Hugging Face cache and return its snapshot folder.

    Raises HubError (cause offline, not_found, gated, disk_full, cancelled or failed).
    An interrupted or cancelled download continues where it stopped when called again.
    """
    from huggingface_hub import constants, snapshot_download

    constants.DOWNLOAD_CHUNK_SIZE = min(constants.DOWNLOAD_CHUNK_SIZE, CHUNK_BYTES)
    report = progress or (lambda _p: None)
    plan = plan_download(repo_id, token=token)
    check_disk(plan)
    meter = _Meter(repo_id, plan.total_bytes, report)
    meter.done = min(plan.partial_bytes, plan.total_bytes)  # where an interrupted one stopped
    report(meter.snapshot())
    try:
        for name in sorted(plan.files, key=lambda n: plan.files[n]):  # config first
            _fetch_blob(plan, name, token, _bar_class(meter, cancel))
        # Every file is in the cache's blobs now: this only links the snapshot folder.
        folder = snapshot_download(
            repo_id, revision=plan.commit or None, allow_patterns=MODEL_FILES, token=token
        )
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise _classify(exc, repo_id) from exc
    report(meter.snapshot(finished=True))
    return Path(folder)


def _fetch_blob(plan: DownloadPlan, name: str, token: str | None, bar: type) -> None:
    """One file into the cache's `blobs/<etag>`, through `<etag>.incomplete`, which is kept
    when the transfer stops and continued (an HTTP Range request) by the next call.

    huggingface_hub 2.4 writes each download to a process-unique temporary file and deletes
    it on failure, so on its own it resumes only within one call, not after a Cancel, a
    crash or a closed app; this keeps the partial file under its legacy name instead."""
    import os

    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get, repo_folder_name
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(plan.repo_id, name, revision=plan.commit or None)
    meta = get_hf_file_metadata(url, token=token)
    folder = plan.cache_dir / repo_folder_name(repo_id=plan.repo_id, repo_type="model")
    blob = folder / "blobs" / str(meta.etag)
    if blob.exists():
        return
    blob.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(blob.name + ".incomplete")
    with partial.open("ab") as fh:
        done = fh.tell()
        if meta.size is None or done < meta.size:
            headers = build_hf_headers(token=token, library_name="lora-studio")
            http_get(
                meta.location,
                fh,
                resume_size=done,
                headers=headers,
                expected_size=meta.size,
                tqdm_class=bar,
            )
    os.replace(partial, blob)


def fetch_config_files(repo_id: str, *, token: str | None = None) -> Path:
    """The repo's config, tokenizer and chat template without its weights (a few MB), for a
    pre-flight that needs the tokenizer: picking a 16 GB model must not start downloading it."""
    from huggingface_hub import snapshot_download

    kwargs: dict[str, Any] = {"allow_patterns": MODEL_FILES, "ignore_patterns": ["*.safetensors"]}
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
    except Exception:
        pass  # not cached yet
    try:
        return Path(snapshot_download(repo_id, token=token, **kwargs))
    except Exception as exc:
        raise _classify(exc, repo_id) from exc


# --------------------------------------------------------------------------- token


def save_token(token: str) -> str:
    """Check a token with the hub and store it where huggingface_hub keeps it (HF_HOME/token),
    never in the studio's own files. Returns the account name."""
    from huggingface_hub import login, whoami

    token = (token or "").strip()
    if not token:
        raise HubError("failed", "Paste a token first (hub: Settings → Access Tokens → read).")
    try:
        login(token=token, add_to_git_credential=False)
        return str(whoami(token)["name"])
    except Exception as exc:
        if isinstance(exc, ValueError) or "Invalid user token" in str(exc):
            raise HubError("gated", "The hub refused this token: copy it again.") from exc
        raise _classify(exc, "the token check") from exc


def token_status() -> str:
    """A line for the UI: whether a token is stored (never the token itself)."""
    from huggingface_hub import get_token

    return (
        "A Hugging Face token is stored (huggingface_hub's token file or HF_TOKEN)."
        if get_token()
        else "No Hugging Face token stored: public models download without one."
    )


# --------------------------------------------------------------------------- background job


class DownloadJob:
    """One download at a time in a background thread, polled by the UI's timer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.cancel_flag = threading.Event()
        self.state: dict[str, Any] = {"status": "idle", "repo_id": "", "line": "", "error": ""}

    def start(self, repo_id: str) -> bool:
        """False when a download is already running."""
        with self.lock:
            if self.thread is not None and self.thread.is_alive():
                return False
            self.cancel_flag = threading.Event()
            self.state = {"status": "checking", "repo_id": repo_id, "line": "", "error": ""}
            self.state["line"] = f"Checking {repo_id} on the hub…"
            self.thread = threading.Thread(target=self._run, args=(repo_id,), daemon=True)
            self.thread.start()
            return True

    def _run(self, repo_id: str) -> None:
        def report(p: DownloadProgress) -> None:
            self._set(status="downloading", line=p.line(), fraction=p.fraction)

        try:
            folder = download(repo_id, progress=report, cancel=self.cancel_flag)
        except HubError as exc:
            self._set(status=exc.cause if exc.cause == "cancelled" else "failed", error=str(exc))
            return
        self._set(status="done", path=str(folder))

    def _set(self, **values: Any) -> None:
        with self.lock:
            self.state = {**self.state, **values}

    def cancel(self) -> None:
        self.cancel_flag.set()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.state)


_JOB = DownloadJob()


def get_download_job() -> DownloadJob:
    return _JOB
