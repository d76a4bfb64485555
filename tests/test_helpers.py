"""The small helpers every stage shares (`studio.util`, `studio.gpu`): one copy each."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest

from studio import util


def test_new_path_never_returns_or_replaces_a_taken_name(tmp_path: Path) -> None:
    first = util.new_path(tmp_path, "compare", ".csv", stamp="20260101-120000")
    assert first.name == "compare-20260101-120000.csv"
    first.write_text("mine", encoding="utf-8")
    second = util.new_path(tmp_path, "compare", ".csv", stamp="20260101-120000")
    assert second.name == "compare-20260101-120000-2.csv"
    assert first.read_text(encoding="utf-8") == "mine"


def test_new_path_claims_each_name_once_when_writers_race(tmp_path: Path) -> None:
    """Eight threads making a folder in the same second get eight folders (mkdir claims)."""
    made: list[Path] = []
    lock = threading.Lock()

    def make() -> None:
        path = util.new_path(tmp_path, "run", stamp="20260101-120000", create=Path.mkdir)
        with lock:
            made.append(path)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(p.is_dir() for p in made)


def test_new_run_dirs_and_cleaned_copies_use_the_same_never_overwrite_rule(studio_home) -> None:
    from studio import runs
    from studio.data import pii

    a, b = runs.new_run_dir("Tiếng Việt"), runs.new_run_dir("Tiếng Việt")
    assert a != b and a.is_dir() and b.is_dir()
    rows = [{"messages": [{"role": "user", "content": "mail an@example.com"}]}]
    one = pii.write_cleaned(rows, "tickets.jsonl", "redact").path
    two = pii.write_cleaned(rows, "tickets.jsonl", "redact").path
    assert one != two and one.exists() and two.exists()
    assert "an@example.com" not in one.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
        (RuntimeError("safetensors: Os { code: 28, kind: StorageFull }"), errno.ENOSPC),
        (OSError("[WinError 112] There is not enough space on the disk"), errno.ENOSPC),
        (RuntimeError("[enforce fail at inline_container.cc] os error 122"), errno.EDQUOT),
        (PermissionError(errno.EPERM, "Operation not permitted"), errno.EACCES),
        (ValueError("bad value"), None),
    ],
)
def test_a_failed_write_is_read_from_the_error_or_its_text(exc: BaseException, code) -> None:
    assert util.write_errno(exc) == code
    assert util.is_disk_full(exc) == (code in (errno.ENOSPC, errno.EDQUOT))


def test_a_wrapped_disk_full_error_is_found_down_the_chain() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("saving the checkpoint failed") from inner
    except RuntimeError as outer:
        assert util.is_disk_full(outer)


def test_short_error_is_one_line_with_the_type() -> None:
    exc = ValueError("Không đọc được tệp\nTraceback (most recent call last): ...")
    assert util.short_error(exc) == "ValueError: Không đọc được tệp"
    assert util.short_error(KeyError()) == "KeyError"
    assert len(util.short_error(OSError("x" * 1000))) == len("OSError: ") + 300


def test_the_train_tabs_gpu_job_blocks_chat_through_the_hand_over(studio_home) -> None:
    """Chat learns of the Train tab's job from `studio.gpu` (no chat -> train import): the job
    manager registers itself when created, and a run on cuda refuses Chat's load."""
    from studio import gpu, runs
    from studio.train import jobs

    manager = jobs.get_manager()
    run = runs.new_run_dir("handover")
    runs.write_metadata(run, {"status": "running", "device": {"used": "cuda"}})
    watched = gpu._active_job
    try:
        gpu.watch_training(lambda: run)  # the manager's view, with its run active
        assert "Training (handover" in (gpu.training_blocker() or "")
        runs.write_metadata(run, {"status": "running", "device": {"used": "cpu"}})
        assert gpu.training_blocker() is None  # chatting during CPU training is allowed
    finally:
        gpu.watch_training(watched)
    assert watched == manager.active_run_dir  # registered by get_manager


def test_one_default_device_rule() -> None:
    import torch

    from studio import gpu

    visible = "cuda" if torch.cuda.is_available() else "cpu"
    assert gpu.default_device() == gpu.default_device("auto") == gpu.default_device("") == visible
    assert gpu.default_device("cpu") == "cpu" and gpu.default_device("cuda:1") == "cuda:1"
