"""Nothing lost, nothing leaks: the PII gate on every path, the job lock, save failures.

Quick tests (no model loads): each drives the real engine function and injects the fault
the way it happens (a dataset nobody scanned, a run folder left by a crash mid-publish, an
OSError with a given errno). The few stand-ins are faults injected into a collaborator
(a scan that crashes, a prepare that blocks), never the code under test.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from studio import paths, runs
from studio.config import ConfigError, RunConfig

PII_ROWS = [
    ("My email is tran.thi.mai@example.com, please call me.", '{"category": "account"}'),
    ("Call me back on +84 912 345 678 about order 77.", '{"category": "shipping"}'),
    ("Where is package 4410?", '{"category": "shipping"}'),
    ("I was charged twice for order 15.", '{"category": "billing"}'),
]


@pytest.fixture()
def fresh_home(tmp_path: Path, studio_home: Path):
    """A data dir of its own (no scan cache from other tests), restored afterwards."""
    home = tmp_path / "home"
    paths.set_data_dir(home)
    yield home
    paths.set_data_dir(studio_home)


@pytest.fixture()
def pii_file(tmp_path: Path) -> Path:
    """A JSONL with a planted email and phone number that the Dataset tab never scanned."""
    path = tmp_path / "with-pii.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for user, reply in PII_ROWS * 3:
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            fh.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path


def cfg_for(path: Path, **changes) -> RunConfig:
    return RunConfig(run_name="gate", dataset_path=str(path), device="cpu", **changes)


# --------------------------------------------------------------------------- the PII gate


def test_cli_refuses_a_never_scanned_dataset_with_pii(fresh_home, pii_file, tmp_path, capsys):
    """`python -m studio.train RUN.yaml` scans the file itself; no run folder is made.

    (The base model does not exist: were the gate missing, the run would fail later with
    exit code 1 instead of being refused with 2.)"""
    from studio.data import pii
    from studio.train import cli

    assert pii.unresolved_pii(pii_file) is None  # never scanned
    yaml_path = cfg_for(pii_file, base_model=str(tmp_path / "no-model")).save(tmp_path / "r.yaml")
    code = cli.main([str(yaml_path), "--data-dir", str(fresh_home)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "personal-data finding" in err and "allow_pii" in err
    assert not list((fresh_home / "runs").glob("gate-*"))
    assert pii.unresolved_pii(pii_file) >= 2  # the gate's scan is cached for next time


def test_allow_pii_lets_the_same_file_through(fresh_home, pii_file):
    from studio.train.prepare import prepare_run

    prepared = prepare_run(cfg_for(pii_file, allow_pii=True))
    runs.mark_done(prepared.run_dir)
    assert (prepared.run_dir / runs.RUN_YAML).is_file()


def test_a_scan_that_crashes_never_counts_as_clean(fresh_home, pii_file, monkeypatch):
    """The gate refuses; the bundled sample's count is unknown (None), not 0."""
    from studio.data import pii, scan
    from studio.train.prepare import check_pii

    def broken_scan(*args, **kwargs):
        raise RuntimeError("scanner crashed")

    monkeypatch.setattr(pii, "scan_rows", broken_scan)
    with pytest.raises(ConfigError) as info:
        check_pii(cfg_for(pii_file))
    assert info.value.field == "allow_pii" and "scanner crashed" in str(info.value)
    assert scan.sample_pii_count() is None


def stopped_run(cfg: RunConfig) -> Path:
    """A run folder as a stopped run leaves it: run.yaml, metadata, one complete checkpoint."""
    run_dir = runs.new_run_dir(cfg.run_name)
    runs.atomic_write_text(run_dir / runs.RUN_YAML, cfg.to_yaml())
    runs.write_metadata(run_dir, {"status": "stopped", "settings": cfg.to_dict()})
    ckpt = run_dir / runs.CHECKPOINTS / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}", encoding="utf-8")
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights")
    return run_dir


def test_resume_passes_the_same_checks_as_a_new_run(fresh_home, pii_file, tmp_path):
    """The PII gate and the CPU optimizer refusal hold on Resume too (one path for both)."""
    from studio.train.prepare import prepare_resume

    run_dir = stopped_run(cfg_for(pii_file))
    with pytest.raises(ConfigError) as info:
        prepare_resume(run_dir)
    assert info.value.field == "allow_pii"

    clean = tmp_path / "clean.jsonl"
    clean.write_text(pii_file.read_text(encoding="utf-8").split("\n")[2] + "\n", encoding="utf-8")
    run_dir = stopped_run(cfg_for(clean, optimizer="paged_adamw_8bit", allow_pii=True))
    with pytest.raises(ConfigError) as info:
        prepare_resume(run_dir)
    assert info.value.field == "optimizer"
    assert runs.open_run(run_dir).status == "stopped"  # untouched, still resumable later


# --------------------------------------------------------------------------- the job lock


def test_preparing_a_run_does_not_hold_the_job_lock(fresh_home, monkeypatch, tmp_path):
    """While a Start prepares (slow: torch, hashing, scanning), the poll, Stop and the
    busy check answer at once, and a second Start is refused."""
    from studio.train import prepare
    from studio.train.jobs import JobBusyError, JobManager

    entered, release = threading.Event(), threading.Event()
    real_prepare = prepare.prepare_run

    def slow_prepare(cfg: RunConfig):
        entered.set()
        release.wait(60)
        return real_prepare(cfg)

    monkeypatch.setattr(prepare, "prepare_run", slow_prepare)
    manager = JobManager()
    missing = cfg_for(tmp_path / "missing.jsonl", allow_pii=True)
    outcome: dict[str, object] = {}

    def first_start() -> None:
        try:
            manager.start(missing)
        except ConfigError as exc:
            outcome["start"] = exc

    def meanwhile() -> None:
        outcome["state"] = manager.snapshot().state
        outcome["stop"] = manager.stop()
        outcome["active"] = manager.active
        for call in (manager.check_idle, lambda: manager.start(missing)):
            try:
                call()
            except JobBusyError as exc:
                outcome.setdefault("busy", []).append(str(exc))

    starter = threading.Thread(target=first_start, daemon=True)
    starter.start()
    assert entered.wait(60)
    poller = threading.Thread(target=meanwhile, daemon=True)
    poller.start()
    poller.join(30)
    released_late = poller.is_alive()  # still waiting for the lock: the bug
    release.set()
    starter.join(60)
    poller.join(30)
    assert not released_late, "snapshot/stop/check_idle waited for prepare_run"
    assert outcome["state"] == "idle" and outcome["stop"] is False and outcome["active"] is True
    assert len(outcome["busy"]) == 2
    assert isinstance(outcome["start"], ConfigError)  # the real prepare refused the file
    manager.check_idle()  # and the slot is free again


# --------------------------------------------------------------------------- adapter publish


class _Saver:
    """What save_adapter writes through: an object with save_pretrained (model, tokenizer)."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def save_pretrained(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")


def test_a_crash_between_the_publish_renames_keeps_an_adapter(fresh_home, monkeypatch):
    from studio.train.loop import save_adapter

    run_dir = runs.new_run_dir("publish")
    runs.atomic_write_text(run_dir / runs.RUN_YAML, RunConfig(run_name="publish").to_yaml())
    tok = _Saver({"tokenizer_config.json": "{}"})
    save_adapter(
        _Saver({"adapter_config.json": "{}", "adapter_model.safetensors": "v1"}), tok, run_dir
    )

    real_replace = os.replace

    def killed_before_second_rename(src, dst):
        if Path(src).name == ".adapter.tmp":
            raise SystemExit("killed")  # the process dies between the two renames
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_second_rename)
    v2 = _Saver({"adapter_config.json": "{}", "adapter_model.safetensors": "v2"})
    with pytest.raises(SystemExit):
        save_adapter(v2, tok, run_dir)
    monkeypatch.undo()
    assert not (run_dir / runs.ADAPTER).exists()  # the crash window itself

    assert runs.open_run(run_dir).has_adapter  # listing the run puts it back
    weights = run_dir / runs.ADAPTER / "adapter_model.safetensors"
    assert weights.read_text(encoding="utf-8") == "v2"  # the newer, complete one
    assert not (run_dir / ".adapter.old").exists() and not (run_dir / ".adapter.tmp").exists()


# --------------------------------------------------------------------------- save failures


def _raised_in_save_pretrained(exc: BaseException) -> BaseException:
    def save_pretrained() -> None:
        raise exc

    try:
        save_pretrained()
    except BaseException as caught:
        return caught
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("exc", "says", "never"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "is full", "quota"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "quota", "is full"),
        (OSError(errno.EROFS, "Read-only file system"), "read-only filesystem", "free disk"),
        (PermissionError(errno.EACCES, "Permission denied"), "write access", "free disk"),
        (RuntimeError("safetensors: No space left on device (os error 28)"), "is full", "quota"),
        (TypeError("cannot pickle '_thread.lock' object"), "not a disk problem", "free disk"),
    ],
)
def test_save_errors_get_the_advice_of_their_cause(tmp_path, exc, says, never):
    from studio.train.loop import is_save_error, save_error_advice

    raised = _raised_in_save_pretrained(exc)
    assert is_save_error(raised)
    message, advice = save_error_advice(raised, tmp_path)
    text = " ".join(advice).lower()
    assert message.startswith("Saving failed") and says.lower() in text, advice
    assert never.lower() not in text, advice
    assert "Earlier checkpoints are kept" in advice[-1]


# --------------------------------------------------------------------------- OOM retry


def test_oom_retry_is_offered_only_when_it_changes_something():
    from studio.train.loop import oom_advice

    oom = RuntimeError("CUDA out of memory")
    leanest = RunConfig(
        method="qlora", batch_size=1, max_seq_len=256, gradient_checkpointing=True
    ).validate()
    message, advice, retry = oom_advice(leanest, "cuda", oom)
    assert retry is None and "leanest" in " ".join(advice)

    for cfg in (
        RunConfig(batch_size=3, grad_accum=2, method="qlora", max_seq_len=256),
        RunConfig(batch_size=4, grad_accum=1, max_seq_len=1024),
        RunConfig(batch_size=1, method="lora", max_seq_len=256, gradient_checkpointing=True),
    ):
        message, advice, retry = oom_advice(cfg.validate(), "cuda", oom)
        assert retry is not None and retry != cfg.to_dict()
        changed = {k for k, v in retry.items() if cfg.to_dict()[k] != v}
        assert all(k in message for k in changed), (message, changed)
        # The effective batch (batch x accumulation) is kept, odd batches included.
        assert retry["batch_size"] * retry["grad_accum"] == cfg.batch_size * cfg.grad_accum


def test_a_run_folder_is_never_reused(fresh_home):
    """Two runs with the same name in the same second get two folders; files stay put."""
    first = runs.new_run_dir("same")
    (first / "keep.txt").write_text("first run", encoding="utf-8")
    second = runs.new_run_dir("same")
    assert second != first and second.is_dir()
    assert (first / "keep.txt").read_text(encoding="utf-8") == "first run"
    assert not any(second.iterdir())
