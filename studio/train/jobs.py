"""Starting a run: in the calling thread, or as the process's one background job.

A run is one pipe, `prepare -> recipe.build -> loop`: `prepare_run(cfg)` (checks, the
dataset read once, PII gate, run folder) returns at once; then `execute_run(prepared)`
tokenizes (prepare's second call) and hands the tokens to `loop.train`, which builds
everything with one `recipe.build` call and trains, all inside the run's record
(`loop.recording`). `run_training(cfg)` and `resume_training(run_dir)` do it in the calling
thread (scripts and tests). `get_manager()` returns the process-wide JobManager, which the
Train tab uses: it prepares the run at once (a bad setting comes back as ConfigError), runs
`execute_run` in a thread, keeps the progress log the UI polls, and turns
Stop into `control.should_training_stop` through the run's TrainerCallback. Because the state
lives in the process and not in a browser session, closing or reloading the page changes
nothing, and two tabs see the same run; a second Start while one runs is refused with
JobBusyError.

With `processes=N` (the Train tab's "Use all N GPUs") the same run goes through
`accelerate launch -m studio.train` in a subprocess (`studio.train.distributed`): the
manager checks the settings here first, reads the run folder from the subprocess's first
line, follows its progress by tailing the run's log.jsonl (the same events the loop emits
in-process), and Stop writes the stop file that all ranks agree on. The subprocess does not
outlive the app: on exit the manager asks its ranks to stop (the stop file), kills them after
a short grace, and records the run as interrupted rather than leave it marked running
(`end_children`). A rank that fails tells the job why (`distributed.failure_line`); the run is
recorded as failed with that rank's error and advice.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio import compat, gpu, paths, runs
from studio.config import ConfigError, RunConfig
from studio.train import distributed

if TYPE_CHECKING:
    from studio.train.loop import TrainResult
    from studio.train.prepare import PreparedRun

MAX_LOG_LINES = 400
STOP_GRACE_S = 15.0  # the app is closing: time for the ranks to stop at a step (checkpoint)
KILL_GRACE_S = 5.0  # then SIGTERM to the launcher and every rank; SIGKILL what is left after


def execute_run(
    prepared: PreparedRun,
    *,
    stop: threading.Event | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    extra_callbacks: Iterable[Any] = (),
) -> TrainResult:
    """A prepared run to its end, one stage after the other inside its record: prepare's
    tokens, then the loop (one `recipe.build`, the steps, the adapter, the checks).

    Never raises for a failure of the run: it comes back as status failed."""
    from studio.train import loop, prepare

    with loop.recording(prepared, stop=stop, on_event=on_event) as live:
        loop.train(live, prepare.tokenize_run(prepared, live.say), extra_callbacks)
    return live.result


def run_training(
    cfg: RunConfig,
    *,
    stop: threading.Event | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    extra_callbacks: Iterable[Any] = (),
) -> TrainResult:
    """A new run from a config, in the calling thread.

    ConfigError comes back before any model loads."""
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
    from studio.train.prepare import prepare_resume

    return execute_run(
        prepare_resume(run_dir), stop=stop, on_event=on_event, extra_callbacks=extra_callbacks
    )


class JobBusyError(RuntimeError):
    """A run is already training; only one runs at a time."""


@dataclass
class JobSnapshot:
    """What the UI shows, copied out under the lock (plain data, safe to read anywhere)."""

    state: str = "idle"  # idle, running, stopping, completed, stopped, failed, interrupted
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
    processes: int = 1  # > 1: an `accelerate launch` subprocess trains (one rank per GPU)
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
        self._proc: subprocess.Popen | None = None  # the accelerate launch of a multi-GPU run
        # Launched subprocesses; the app's exit (or this manager's end) stops them. The
        # finalizer holds the list, not the manager.
        self._children: list[_Child] = []
        self._closer = weakref.finalize(self, end_children, self._children)

    # -- control --------------------------------------------------------------------------

    def start(
        self, cfg: RunConfig, *, extra_callbacks: Iterable[Any] = (), processes: int = 1
    ) -> Path:
        """Start a new run; ConfigError (bad setting) or JobBusyError come back at once.

        processes > 1: train through `accelerate launch` on that many processes."""
        from studio import heavy

        heavy.ready()  # one thread imports torch/transformers at a time
        from studio.train.prepare import prepare_run

        if processes > 1:
            return self._launch_processes(processes, cfg=cfg)
        return self._prepare_and_launch(lambda: prepare_run(cfg), False, extra_callbacks)

    def resume(
        self, run_dir: str | Path, *, extra_callbacks: Iterable[Any] = (), processes: int = 1
    ) -> Path:
        """Continue a stopped/failed/interrupted run from its last checkpoint."""
        from studio import heavy

        heavy.ready()  # one thread imports torch/transformers at a time
        from studio.train.prepare import prepare_resume

        if processes > 1:
            return self._launch_processes(processes, run_dir=Path(run_dir))
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
            if self._proc is not None and self._snap.run_dir:  # every rank polls the file
                distributed.request_stop(self._snap.run_dir)
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
                # the Chat model must not share the GPU with training (OOM on a 12 GB card)
                freed = gpu.release_for_training(prepared.device, prepared.run_dir.name)
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

    # -- several processes: `accelerate launch` in a subprocess ------------------------------

    def _launch_processes(
        self, processes: int, *, cfg: RunConfig | None = None, run_dir: Path | None = None
    ) -> Path:
        """Check the settings here, start `accelerate launch -m studio.train` and follow it.

        Rank 0 of the subprocess prepares the run; its first line names the run folder, which
        this waits for (seconds: imports and the process group), so Start returns it as the
        one-process Start does. A refused setting comes back as ConfigError."""
        with self._lock:
            self._refuse_if_busy()
            self._preparing = True
        args: list[str] = []
        child: _Child | None = None
        try:
            args, history, offset = _process_args(cfg, run_dir)
            base = (cfg or RunConfig.load(Path(run_dir or "") / runs.RUN_YAML)).base_model
            distributed.fetch_base_before_launch(base)
            child = _start_processes(args, processes)
            self._children.append(child)  # from here on, the app's exit stops it
            found = _await_run_folder(child)
        except BaseException:
            if child is not None:
                kill_tree(child.proc, KILL_GRACE_S)
                self._children.remove(child)
            with self._lock:
                self._preparing = False
            raise
        finally:
            if cfg is not None and args:
                Path(args[0]).unlink(missing_ok=True)  # run.yaml is in the run folder now
        with self._lock:
            self._preparing = False
            method = (cfg or RunConfig.load(found / runs.RUN_YAML)).method
            self._watch(child, found, method, history, offset)
            return found

    def _watch(
        self,
        child: _Child,
        run_dir: Path,
        method: str,
        history: list[dict[str, Any]],
        offset: int,
    ) -> None:
        """Follow the subprocess's run through its log.jsonl until the processes exit; then
        record an end nobody recorded (`settle`: a rank's failure, or processes that died)."""
        proc, processes = child.proc, child.processes
        child.run_dir = run_dir
        self._stop = threading.Event()
        self._done.clear()
        self._proc = proc
        self._snap = JobSnapshot(
            state="running",
            run_dir=str(run_dir),
            run_name=run_dir.name,
            method=method,
            history=history,
            message=f"Starting {processes} processes...",
            started_at=time.time(),
            processes=processes,
            version=self._snap.version + 1,
        )
        for entry in history:
            self._apply_progress(entry)

        def work() -> None:
            pos, final = offset, None
            while True:
                exited = proc.poll() is not None
                pos, ended = self._tail(run_dir / runs.LOG, pos)
                final = ended or final
                if exited:
                    break
                time.sleep(0.5)
            if child.reader is not None:
                child.reader.join(timeout=5)  # the last lines, a failed rank's among them
            entry = settle(child)
            if entry is not None:  # the record settle wrote replaces the log's (rank 0's echo)
                self._on_event(entry)
                final = _final_of(entry)
            if final is None:  # the run folder could not be written: say what the job knows
                final = {"state": "failed", "message": _exited_message(child)}
            with self._lock:
                self._proc = None
                with contextlib.suppress(ValueError):
                    self._children.remove(child)
                self._update(finished_at=time.time(), **final)
            self._done.set()

        self._thread = threading.Thread(target=work, name=f"train-{run_dir.name}", daemon=True)
        self._thread.start()

    def _tail(self, log: Path, pos: int) -> tuple[int, dict[str, Any] | None]:
        """Feed the log's new complete lines to `_on_event`; the final state once finished."""
        try:
            with log.open("rb") as fh:
                fh.seek(pos)
                chunk = fh.read()
        except OSError:
            return pos, None
        complete = chunk[: chunk.rfind(b"\n") + 1]
        final = None
        for raw in complete.splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            self._on_event(entry)
            if entry.get("event") == "finished":
                final = _final_of(entry)
        return pos + len(complete), final

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


def _process_args(
    cfg: RunConfig | None, run_dir: Path | None
) -> tuple[list[str], list[dict[str, Any]], int]:
    """`studio.train` arguments (a temporary run.yaml, or --resume), the run's history so
    far and where its log ends now. The settings pass the one-process run's checks first."""
    from studio.train.prepare import check_settings

    if cfg is not None:
        if cfg.dataset_path:
            cfg = cfg.replace(dataset_path=str(Path(cfg.dataset_path).expanduser().resolve()))
        check_settings(cfg)
        fd, name = tempfile.mkstemp(prefix="run-", suffix=".yaml")
        os.close(fd)
        cfg.save(name)
        return [name], [], 0
    assert run_dir is not None
    check_settings(RunConfig.load(run_dir / runs.RUN_YAML))
    history = [e for e in runs.load_log(run_dir) if e.get("kind")]
    log = run_dir / runs.LOG
    return ["--resume", str(run_dir)], history, log.stat().st_size if log.is_file() else 0


@dataclass(eq=False)
class _Child:
    """One `accelerate launch` subprocess and what the job reads from it. It holds no reference
    to the manager, so the exit hook (`end_children`) can stop it whatever became of that."""

    proc: subprocess.Popen
    processes: int
    output: list[str] = field(default_factory=list)  # its last 200 lines
    failures: list[str] = field(default_factory=list)  # the ranks' FAILED_MARK lines
    reader: threading.Thread | None = None
    run_dir: Path | None = None
    closing: bool = False  # the app is closing: the end is "interrupted", not a failure
    settled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def _start_processes(args: list[str], processes: int) -> _Child:
    """`accelerate launch` of the run; a reader thread collects its output lines.

    In a session of its own: a Ctrl-C in the app's terminal reaches the app alone, whose exit
    then stops the run with the stop file first (`end_children`)."""
    env = compat.utf8_child_env({**os.environ, "PYTHONUNBUFFERED": "1"})
    if distributed.cpu_processes():
        env["CUDA_VISIBLE_DEVICES"] = ""  # the forced CPU run: gloo, no card touched
    else:
        gpu.release_for_training("cuda")  # the chat model must not share a card with a rank
    cmd = distributed.launch_command([*args, "--data-dir", str(paths.data_dir())], processes)
    return spawn(cmd, env, processes)


def spawn(cmd: list[str], env: dict[str, str] | None, processes: int) -> _Child:
    """Start `cmd` in its own session and collect its output (and any rank's failure line)."""
    proc = subprocess.Popen(
        cmd,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        **compat.new_session_kwargs(),
    )
    child = _Child(proc, processes)

    def read() -> None:
        for line in proc.stdout or []:
            if distributed.FAILED_MARK in line:
                child.failures.append(line.strip())
            child.output.append(line.rstrip())
            del child.output[:-200]

    child.reader = threading.Thread(target=read, name="accelerate-output", daemon=True)
    child.reader.start()
    return child


def _announced_folder(output: list[str]) -> Path | None:
    """The run folder rank 0 prints first ("Run folder: ..."), once it has."""
    for line in list(output):
        if line.startswith("Run folder: "):
            return Path(line.removeprefix("Run folder: ").strip())
    return None


def _await_run_folder(child: _Child, timeout: float = distributed.PREPARE_WAIT_S) -> Path:
    """The run folder rank 0 announces, or why the processes ended before it (ConfigError)."""
    proc, output = child.proc, child.output
    deadline = time.time() + timeout
    while time.time() < deadline:
        exited = proc.poll() is not None
        if exited and child.reader is not None:
            child.reader.join(timeout=5)
        found = _announced_folder(output)
        if found is not None:
            return found
        if exited:
            refused = [x for x in output if x.startswith(("Invalid setting", "Could not prepare"))]
            text = refused[-1] if refused else " ".join(output[-5:])
            raise ConfigError("run", f"the training processes did not start: {text}")
        time.sleep(0.2)
    raise ConfigError(
        "run", f"the training processes did not start within {timeout / 60:.0f} minutes"
    )


# --- how a launched run ended, and the app's exit ---------------------------------------------


def _final_of(entry: dict[str, Any]) -> dict[str, Any]:
    """The snapshot fields of a log's "finished" entry."""
    return {
        "state": entry.get("status", "failed"),
        "message": entry.get("message", ""),
        "advice": entry.get("advice") or [],
        "retry_config": entry.get("retry_config"),
        "checks": entry.get("checks") or [],
    }


def _exited_message(child: _Child) -> str:
    last = " ".join(line.strip() for line in child.output[-3:])
    return (
        f"The training processes exited (code {child.proc.returncode}) before the run"
        f" finished: {last}"
    )


def settle(child: _Child) -> dict[str, Any] | None:
    """Once the processes are gone: record the end that no rank recorded, and return its log
    entry (None: rank 0's own record stands).

    - the app closed the run (`closing`) while it was still marked running: "interrupted";
    - a rank printed its failure (`distributed.failure_line`) and rank 0 recorded none, or
      recorded only the echo (its all-reduce lost the failed rank): "failed", with the error,
      advice and retry config of the rank that broke first;
    - the processes died without a word (killed, crashed): "failed", with their last lines.
    """
    from studio.train.loop import TrainResult, record_end

    with child.lock:
        run_dir = child.run_dir or _announced_folder(child.output)
        if child.settled or run_dir is None:
            return None
        child.settled = True
        status = runs.read_metadata(run_dir).get("status")
        if status in ("completed", "stopped"):
            return None
        root = distributed.first_failure(child.failures)
        resume = "Resume continues from the last complete checkpoint."
        if child.closing:
            if status != "running":
                return None
            result = TrainResult(
                run_dir, "interrupted", "The app closed while this run was training.", [resume]
            )
        elif root is not None and (status != "failed" or root["rank"] != 0):
            result = TrainResult(
                run_dir,
                "failed",
                f"Rank {root['rank']} of {child.processes} failed: {root['message']}",
                list(root.get("advice") or []),
                root.get("retry_config"),
            )
        elif status == "failed":
            return None
        else:
            result = TrainResult(run_dir, "failed", _exited_message(child), [resume])
        return record_end(run_dir, result)


def kill_tree(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the launcher and every process under it, then SIGKILL what is left after
    `grace_s`. Not only its process group: torchrun starts each rank in a session of its own."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        family = []
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)


def end_children(
    children: list[_Child], grace_s: float | None = None, kill_grace_s: float | None = None
) -> None:
    """The app is closing (or its job manager ends): stop every launched run, never leaving
    one marked running. First the stop file, so the ranks stop together at a step with a
    checkpoint; after `grace_s` they are killed, and the run is recorded as interrupted (it
    resumes from its last checkpoint)."""
    grace = STOP_GRACE_S if grace_s is None else grace_s
    kill_grace = KILL_GRACE_S if kill_grace_s is None else kill_grace_s
    for child in list(children):
        child.closing = True
        run_dir = child.run_dir or _announced_folder(child.output)
        if child.proc.poll() is None:
            if run_dir is not None:
                with contextlib.suppress(OSError):
                    distributed.request_stop(run_dir)
            try:
                child.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                kill_tree(child.proc, kill_grace)
        with contextlib.suppress(Exception):  # exiting: a record that fails must not hang it
            settle(child)


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
            gpu.watch_training(_manager.active_run_dir)  # Chat asks before it loads
        return _manager
