"""Starting a run: in the calling thread, or as the process's one background job.

`run_training(cfg)` and `resume_training(run_dir)` run prepare -> loop in the calling thread
(scripts and tests). `get_manager()` returns the process-wide JobManager, which the Train tab
uses: it prepares the run at once (a bad setting comes back as ConfigError), runs
`studio.train.loop.execute_run` in a thread, keeps the progress log the UI polls, and turns
Stop into `control.should_training_stop` through the run's TrainerCallback. Because the state
lives in the process and not in a browser session, closing or reloading the page changes
nothing, and two tabs see the same run; a second Start while one runs is refused with
JobBusyError.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio import runs
from studio.config import RunConfig

if TYPE_CHECKING:
    from studio.train.loop import TrainResult

MAX_LOG_LINES = 400


def run_training(
    cfg: RunConfig,
    *,
    stop: threading.Event | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    extra_callbacks: Iterable[Any] = (),
) -> TrainResult:
    """A new run from a config, in the calling thread.

    ConfigError comes back before any model loads."""
    from studio.train.loop import execute_run
    from studio.train.prepare import prepare_run

    return execute_run(
        prepare_run(cfg), stop=stop, on_event=on_event, extra_callbacks=extra_callbacks
    )


def resume_training(
    run_dir: str | Path,
    *,
    stop: threading.Event | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    extra_callbacks: Iterable[Any] = (),
) -> TrainResult:
    """Continue a stopped, failed or interrupted run from its last checkpoint to the end."""
    from studio.train.loop import execute_run
    from studio.train.prepare import prepare_resume

    return execute_run(
        prepare_resume(run_dir), stop=stop, on_event=on_event, extra_callbacks=extra_callbacks
    )


class JobBusyError(RuntimeError):
    """A run is already training; only one runs at a time."""


@dataclass
class JobSnapshot:
    """What the UI shows, copied out under the lock (plain data, safe to read anywhere)."""

    state: str = "idle"  # idle, running, stopping, completed, stopped, failed
    run_dir: str | None = None
    run_name: str = ""
    method: str = ""
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    peak_memory_mb: float | None = None
    memory_kind: str = ""
    power_w: float | None = None
    energy_kwh: float | None = None
    energy_cost: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # train/eval log entries
    log_lines: list[str] = field(default_factory=list)
    message: str = ""
    advice: list[str] = field(default_factory=list)
    retry_config: dict[str, Any] | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    version: int = 0  # bumps on every change, so a poller can skip redraws

    @property
    def active(self) -> bool:
        return self.state in ("running", "stopping")


class JobManager:
    """Runs one training run at a time in a background thread."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._snap = JobSnapshot()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self._preparing = False  # a Start/Resume is preparing its run outside the lock

    # -- control --------------------------------------------------------------------------

    def start(self, cfg: RunConfig, *, extra_callbacks: Iterable[Any] = ()) -> Path:
        """Start a new run; ConfigError (bad setting) or JobBusyError come back at once."""
        from studio.train.prepare import prepare_run

        return self._prepare_and_launch(lambda: prepare_run(cfg), False, extra_callbacks)

    def resume(self, run_dir: str | Path, *, extra_callbacks: Iterable[Any] = ()) -> Path:
        """Continue a stopped/failed/interrupted run from its last checkpoint."""
        from studio.train.prepare import prepare_resume

        return self._prepare_and_launch(lambda: prepare_resume(run_dir), True, extra_callbacks)

    def _prepare_and_launch(
        self, prepare: Callable[[], Any], resumed: bool, extra_callbacks: Iterable[Any]
    ) -> Path:
        """Claim the one slot under the lock, prepare outside it, publish under it.

        Preparing imports torch, hashes, reads and may PII-scan the dataset: seconds to
        minutes. Holding the lock that long would freeze every tab's poll, Stop and Chat's
        check, so only the claim and the publication hold it; the claim alone refuses a
        second Start meanwhile.
        """
        with self._lock:
            self._refuse_if_busy()
            self._preparing = True
        try:
            prepared = prepare()
            log = runs.load_log(prepared.run_dir) if resumed else []
            history = [e for e in log if e.get("kind")]
        except BaseException:
            with self._lock:
                self._preparing = False
            raise
        with self._lock:
            self._preparing = False
            self._launch(prepared, history, extra_callbacks)
            return prepared.run_dir

    def stop(self) -> bool:
        """Ask the run to end at the next step boundary (its adapter is saved). False if idle."""
        with self._lock:
            if not self._snap.active:
                return False
            self._stop.set()
            self._update(state="stopping", message="Stopping at the next step...")
            self._add_line("Stop requested")
            return True

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            s = self._snap
            return replace(
                s,
                history=list(s.history),
                log_lines=list(s.log_lines),
                advice=list(s.advice),
                checks=list(s.checks),
                elapsed_s=((s.finished_at or time.time()) - s.started_at if s.started_at else 0.0),
            )

    def wait(self, timeout: float | None = None) -> JobSnapshot:
        """Block until the current run ends (tests and the CLI-like callers)."""
        self._done.wait(timeout)
        return self.snapshot()

    @property
    def active(self) -> bool:
        """A run is training, or being prepared (so Chat does not load a model meanwhile)."""
        with self._lock:
            return self._snap.active or self._preparing

    def active_run_dir(self) -> Path | None:
        with self._lock:
            return Path(self._snap.run_dir) if self._snap.active and self._snap.run_dir else None

    # -- internals ------------------------------------------------------------------------

    def check_idle(self) -> None:
        """Raise JobBusyError when a run is training (what a second Start gets)."""
        with self._lock:
            self._refuse_if_busy()

    def _refuse_if_busy(self) -> None:
        if self._preparing:
            raise JobBusyError(
                "A run is being prepared (checking the data and settings); wait a moment."
            )
        if self._snap.active or (self._thread is not None and self._thread.is_alive()):
            s = self._snap
            where = f" (step {s.step}/{s.total_steps})" if s.total_steps else ""
            raise JobBusyError(
                f"A run is already training: {Path(s.run_dir or '').name}{where}. "
                "Stop it first, or wait for it to finish."
            )

    def _launch(self, prepared: Any, history: list[dict[str, Any]], extra_callbacks) -> None:
        from studio.train.loop import execute_run

        self._stop = threading.Event()
        self._done.clear()
        cfg = prepared.cfg
        self._snap = JobSnapshot(
            state="running",
            run_dir=str(prepared.run_dir),
            run_name=prepared.run_dir.name,
            method=cfg.method,
            history=history,
            message="Loading the model..."
            if prepared.resume_from is None
            else f"Resuming from {prepared.resume_from.name}...",
            started_at=time.time(),
            version=self._snap.version + 1,
        )
        for entry in history:
            self._apply_progress(entry)
        stop, callbacks = self._stop, list(extra_callbacks)

        def work() -> None:
            try:
                from studio.chat.engine import release_for_training

                # the Chat model must not share the GPU with training (OOM on a 12 GB card)
                freed = release_for_training(prepared.device, prepared.run_dir.name)
                if freed:
                    self._on_event({"event": "message", "text": freed})
                result = execute_run(
                    prepared, stop=stop, on_event=self._on_event, extra_callbacks=callbacks
                )
                final = {
                    "state": result.status,
                    "message": result.message,
                    "advice": result.advice,
                    "retry_config": result.retry_config,
                    "checks": result.checks,
                }
            except BaseException as exc:  # never leave the manager stuck in "running"
                final = {"state": "failed", "message": f"{type(exc).__name__}: {exc}"}
            with self._lock:
                self._update(finished_at=time.time(), **final)
            self._done.set()

        self._thread = threading.Thread(target=work, name=f"train-{prepared.run_dir.name}")
        self._thread.daemon = True  # a closing app must not hang on a run; the run folder
        self._thread.start()  # then reads "interrupted" and can be resumed

    def _on_event(self, entry: dict[str, Any]) -> None:
        with self._lock:
            if entry.get("kind") in ("train", "eval"):
                self._snap.history.append(entry)
                self._apply_progress(entry)
                if entry.get("kind") == "train":
                    self._add_line(_train_line(entry))
                else:
                    self._add_line(f"step {entry['step']}: eval loss {entry['eval_loss']:.4f}")
            elif entry.get("event") == "message":
                self._add_line(entry["text"])
                if self._snap.state == "running" and self._snap.step == 0:
                    self._snap.message = entry["text"]
            elif entry.get("event") == "status":
                self._snap.total_steps = entry.get("total_steps")
                if self._snap.state == "running":
                    self._snap.message = "Training..."
            elif entry.get("event") == "checkpoint":
                self._add_line(f"checkpoint saved: {Path(entry['path']).name}")
            elif entry.get("event") == "traceback":
                self._add_line(entry["text"].rstrip())
            elif entry.get("event") == "finished":
                self._add_line(f"{entry['status'].upper()}: {entry['message']}")
                for line in entry.get("advice") or []:
                    self._add_line(f"  - {line}")
            self._snap.version += 1

    def _apply_progress(self, e: dict[str, Any]) -> None:
        s = self._snap
        if e.get("kind") == "train":
            s.step, s.total_steps = int(e["step"]), e.get("total_steps") or s.total_steps
            s.epoch, s.train_loss = e.get("epoch"), e.get("loss")
            s.learning_rate, s.tokens_per_s = e.get("learning_rate"), e.get("tokens_per_s")
            s.eta_s, s.peak_memory_mb = e.get("eta_s"), e.get("peak_memory_mb")
            s.memory_kind, s.power_w = e.get("memory_kind", ""), e.get("power_w")
            s.energy_kwh, s.energy_cost = e.get("energy_kwh"), e.get("energy_cost")
        elif e.get("kind") == "eval":
            s.eval_loss = e.get("eval_loss")

    def _add_line(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self._snap.log_lines.append(f"{stamp} {text}")
        del self._snap.log_lines[:-MAX_LOG_LINES]

    def _update(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self._snap, key, value)
        self._snap.version += 1


def _train_line(e: dict[str, Any]) -> str:
    return (
        f"step {e['step']}/{e.get('total_steps')} · loss {e['loss']:.4f}"
        f" · lr {e['learning_rate']:.2e} · {e.get('tokens_per_s', 0):.0f} tok/s"
        f" · ETA {e.get('eta_s', 0):.0f}s"
    )


_manager: JobManager | None = None
_manager_guard = threading.Lock()


def get_manager() -> JobManager:
    """The process-wide job manager (created on first use)."""
    global _manager
    with _manager_guard:
        if _manager is None:
            _manager = JobManager()
        return _manager
