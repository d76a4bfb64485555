"""Run folders: one per training run under `<data dir>/runs/<run_name>-<YYYYmmdd-HHMMSS>/`.

A run folder holds `run.yaml`, `training_metadata.json`, `log.jsonl`, `adapter/`, `README.md`,
`chat_template.jinja` and `checkpoints/checkpoint-N/`. This module creates folders (never
reusing one), writes files atomically, reads the log back for curves, and is the one reader
of a run folder (`open_run`, `list_runs`): the Train, Chat and Export tabs, the export and
the training plan all read a run's base model, method and adapter through it.

A run whose metadata still says "running" but that no live process is training (the app or
CLI was killed) is listed as "interrupted"; liveness is a lock file the training process holds
(`flock`, released by the kernel when a process dies), so it also works across processes. Where
there is no such lock (Windows) the lock file names the process id and its start time, and a
run is live while that very process runs (a reused id does not count).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import threading
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from studio import compat, paths
from studio.util import new_path

STATUSES = ("running", "completed", "stopped", "failed", "interrupted")
METADATA = "training_metadata.json"
LOG = "log.jsonl"
RUN_YAML = "run.yaml"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
LOCK = ".lock"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: a folder holding it is an adapter
TOKENIZER_CONFIG = "tokenizer_config.json"  # training saves its tokenizer beside the adapter
EXPORT = "export"  # export/, then export-<time>/: never overwritten
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")

# Runs being trained by this process (their lock files are held open here).
_live: dict[str, TextIO | None] = {}
_live_guard = threading.Lock()


class RunError(ValueError):
    """A folder is not a run (or not one that can be read back); the message says what to pick."""


@dataclass
class Run:
    """One run folder read back: the one view the Train, Chat and Export tabs, the training
    plan and the benchmarks share, so they agree on its base model, method and adapter.

    Built by `open_run` (one folder) and `list_runs` (all of them); plain data, no model.
    """

    path: Path
    name: str  # the folder name, e.g. "support-20250101-120000"
    status: str  # running, completed, stopped, failed, interrupted
    base_model: str  # the name training resolved (what the user picked)
    base_model_path: str | None  # the folder training loaded it from, when recorded
    method: str  # lora or qlora
    train_loss: float | None  # last logged training loss
    eval_loss: float | None  # last evaluation loss
    created: str  # ISO time the run started
    steps: int  # optimizer steps done
    total_steps: int | None
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # the run's RunConfig as a dict

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    @property
    def objective(self) -> str:
        """What the adapter learned: sft, or dpo (preference pairs); runs before DPO: sft."""
        return str(self.settings.get("objective") or "sft")

    @property
    def method_words(self) -> str:
        """The method as lists show it: "lora", or "lora · dpo" for a preference run."""
        return self.method if self.objective == "sft" else f"{self.method} · {self.objective}"

    @property
    def has_adapter(self) -> bool:
        """A final adapter with its weights (what Export needs and Chat loads by default)."""
        return is_adapter_dir(self.adapter_dir) and any(self.adapter_dir.glob("adapter_model.*"))

    @property
    def adapter_checkpoints(self) -> list[Path]:
        return adapter_checkpoints(self.path)

    @property
    def label(self) -> str:
        loss = f"{self.train_loss:.3f}" if self.train_loss is not None else "-"
        return f"{self.name} · {self.status} · loss {loss}"

    @property
    def template_hash(self) -> str | None:
        """The hash of the chat template training used (`chat_format.template_hash`)."""
        return self.metadata.get("template_hash")

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("chat_template")

    @property
    def trust_remote_code(self) -> bool:
        return bool(self.settings.get("trust_remote_code", False))

    @property
    def dataset(self) -> dict[str, Any]:
        """Where the rows came from: path, format, sha256 (the data file hash training recorded)."""
        ds = self.metadata.get("dataset")
        ds = dict(ds) if isinstance(ds, dict) else {}
        ds.setdefault("path", self.settings.get("dataset_path") or "")
        if not ds.get("format"):
            ds["format"] = self.settings.get("dataset_format") or "auto"
        return ds


# --- files -------------------------------------------------------------------------------


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write via a temp file in the same folder and rename, so a crash never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        compat.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str))


def new_run_dir(run_name: str, root: Path | None = None) -> Path:
    """Create `runs/<run_name>-<timestamp>/`; a clash within the same second gets a suffix.

    The name is NFC-normalised, so a name typed in decomposed form gets the same folder name.
    """
    run_name = unicodedata.normalize("NFC", run_name)
    root = root or paths.runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    return new_path(root, run_name, create=Path.mkdir)  # exclusive: a folder is never reused


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file, or {} when missing or unreadable (a run killed mid-write)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_metadata(run_dir: str | Path) -> dict[str, Any]:
    """The run's metadata, or {} when missing or unreadable."""
    return read_json(Path(run_dir) / METADATA)


def write_metadata(run_dir: str | Path, meta: dict[str, Any]) -> Path:
    return atomic_write_json(Path(run_dir) / METADATA, meta)


def open_log(run_dir: str | Path) -> TextIO:
    """Open log.jsonl for appending; each entry is flushed as written so a SIGKILL keeps it."""
    return (Path(run_dir) / LOG).open("a", encoding="utf-8")


def append_log(fh: TextIO, entry: dict[str, Any]) -> None:
    fh.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
    fh.flush()


def load_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every logged entry in order; entries a resume replaced are dropped.

    On resume the run restarts from checkpoint N, so steps after N logged before the resume
    were redone; the "resumed" event marks that and the older entries are left out. A torn
    last line (the process died mid-write) is skipped. Lines end at a line feed only: entries are
    written with `ensure_ascii=False`, so their text may hold U+2028 or U+0085, which
    `str.splitlines()` would wrongly treat as line ends.
    """
    entries: list[dict[str, Any]] = []
    try:
        lines = (Path(run_dir) / LOG).read_text(encoding="utf-8").split("\n")
    except OSError:
        return entries
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if entry.get("event") == "resumed":
            start = int(entry.get("from_step", 0))
            entries = [e for e in entries if "event" in e or int(e.get("step", 0)) <= start]
        entries.append(entry)
    return entries


def loss_curves(entries: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) pairs for the train and eval curves of a log."""
    train = [(int(e["step"]), float(e["loss"])) for e in entries if e.get("kind") == "train"]
    evals = [(int(e["step"]), float(e["eval_loss"])) for e in entries if e.get("kind") == "eval"]
    return {"train": train, "eval": evals}


# --- the adapter ---------------------------------------------------------------------------


def adapter_staging(run_dir: str | Path) -> tuple[Path, Path, Path]:
    """(adapter/, the folder a new adapter is written into, where the previous one waits)."""
    run_dir = Path(run_dir)
    return run_dir / ADAPTER, run_dir / f".{ADAPTER}.tmp", run_dir / f".{ADAPTER}.old"


def publish_adapter(run_dir: str | Path) -> Path:
    """Swap the fully written staging folder in as adapter/.

    A first save is one rename (atomic). Replacing an adapter takes two (adapter -> .old,
    .tmp -> adapter); a crash between them leaves both complete folders and no adapter/,
    which `recover_adapter` puts right before the run is read again.
    """
    final, tmp, old = adapter_staging(run_dir)
    if final.exists():
        _remove_tree(old)
        compat.replace(final, old)
    compat.replace(tmp, final)
    _remove_tree(old)
    return final


def recover_adapter(run_dir: str | Path) -> bool:
    """Finish a publish that a crash cut short; True when adapter/ was put back.

    Only `.old` proves a swap had begun: then `.tmp` is complete (it is renamed only once
    written) and is the newer adapter; without `.tmp`, the previous adapter goes back. A
    `.tmp` alone is a save cut short and stays unused (the next save replaces it).
    """
    final, tmp, old = adapter_staging(run_dir)
    if not old.is_dir():
        return False
    try:
        if final.exists():
            _remove_tree(old)  # the swap had finished; only the clean-up was missed
            return False
        compat.replace(tmp if tmp.is_dir() else old, final)
        _remove_tree(old)
    except OSError:
        return False  # a read-only folder: nothing to fix here, and nothing lost
    return True


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# --- kill points (tests) -----------------------------------------------------------------

KILL_ENV = "LORA_STUDIO_TEST_KILL_AT"


def kill_point(name: str) -> None:
    """SIGKILL this process here when LORA_STUDIO_TEST_KILL_AT names this point.

    Only tests/test_kill.py sets it: it proves that a run killed during tokenizing, a step, a
    checkpoint save or the final save is listed as interrupted and resumes. Unset, a no-op.
    """
    if os.environ.get(KILL_ENV) == name:
        import signal

        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


# --- checkpoints -------------------------------------------------------------------------


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Complete: trainer_state.json (written last) parses
    and the adapter weights are there, so a save cut short is never resumed from."""
    folder = Path(run_dir) / CHECKPOINTS
    found: list[tuple[int, Path]] = []
    if not folder.is_dir():
        return []
    for sub in folder.iterdir():
        match = _CKPT_RE.match(sub.name)
        if not match or not sub.is_dir():
            continue
        try:
            json.loads((sub / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not any(sub.glob("adapter_model.*")):
            continue
        found.append((int(match.group(1)), sub))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


# --- liveness ----------------------------------------------------------------------------


def mark_live(run_dir: str | Path) -> None:
    """Claim the run for this process until `mark_done`; dies with the process."""
    key = str(Path(run_dir).resolve())
    busy = f"run {Path(run_dir).name} is being trained by another process"
    lock = Path(run_dir) / LOCK
    if lock.is_file() and compat.lock_held(lock) is None:  # no kernel lock: ask the owner
        pid, started = _lock_owner(lock)
        if pid is not None and pid != os.getpid() and compat.process_alive(pid, started):
            raise RuntimeError(busy)
    fh = lock.open("w", encoding="utf-8")
    try:
        compat.lock_exclusive(fh)
    except OSError as exc:
        fh.close()
        raise RuntimeError(busy) from exc
    started = compat.process_started()
    fh.write(f"{os.getpid()} {started}" if started is not None else str(os.getpid()))
    fh.flush()
    with _live_guard:
        _live[key] = fh


def mark_done(run_dir: str | Path) -> None:
    key = str(Path(run_dir).resolve())
    with _live_guard:
        fh = _live.pop(key, None)
    if fh is not None:
        with contextlib.suppress(OSError):
            fh.close()


def is_live(run_dir: str | Path, meta: dict[str, Any] | None = None) -> bool:
    """True while some process is training this run."""
    run_dir = Path(run_dir)
    with _live_guard:
        if str(run_dir.resolve()) in _live:
            return True
    lock = run_dir / LOCK
    if not lock.is_file():
        return False
    held = compat.lock_held(lock)
    if held is not None:
        return held
    pid, started = _lock_owner(lock)
    return pid is not None and pid != os.getpid() and compat.process_alive(pid, started)


def _lock_owner(lock: Path) -> tuple[int | None, float | None]:
    """The process id and start time a lock file names ("1234 1733480000.5")."""
    try:
        parts = lock.read_text(encoding="utf-8").split()
        return int(parts[0]), float(parts[1]) if len(parts) > 1 else None
    except (OSError, ValueError, IndexError):
        return None, None


# --- listing -----------------------------------------------------------------------------


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def adapter_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints that hold an adapter to chat with, oldest first."""
    return [p for p in checkpoints(run_dir) if is_adapter_dir(p)]


def adapter_base(adapter_dir: Path) -> str | None:
    """The base model PEFT recorded in an adapter's config (a bare adapter's only clue)."""
    return read_json(adapter_dir / ADAPTER_CONFIG).get("base_model_name_or_path") or None


def find_run_dir(path: str | Path, up: int = 3) -> Path | None:
    """The run folder holding `path` (itself, or an adapter/checkpoint inside it), or None."""
    path = Path(path)
    for folder in [path, *list(path.parents)[:up]]:
        if (folder / METADATA).is_file() or (folder / RUN_YAML).is_file():
            return folder
    return None


def open_run(run_dir: str | Path) -> Run:
    """Read one run folder back; RunError when it is not one (says what to pick instead)."""
    raw = str(run_dir or "").strip()
    if not raw:
        raise RunError("Pick a run first.")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise RunError(f"{path}: no such run folder.")
    run = _read_run(path.resolve())
    if run is None:
        raise RunError(
            f"{path}: not a run folder (no {METADATA} or {RUN_YAML}); pick one under"
            f" {paths.runs_dir()}."
        )
    return run


def _read_run(run_dir: Path) -> Run | None:
    """The Run of a folder, or None when it is not a run folder."""
    meta = read_metadata(run_dir)
    if not meta and not (run_dir / RUN_YAML).is_file():
        return None
    live = is_live(run_dir, meta)
    if not live:
        recover_adapter(run_dir)  # a crash mid-publish: put adapter/ back before reading it
    settings = _settings(run_dir, meta)
    status = meta.get("status") or "interrupted"
    if status == "running" and not live:
        status = "interrupted"
    train_loss, eval_loss, steps = _last_losses(run_dir, meta, status)
    base_name, base_path = _base_model(run_dir, meta, settings)
    return Run(
        path=run_dir,
        name=run_dir.name,
        status=status,
        base_model=base_name,
        base_model_path=base_path,
        method=str(settings.get("method") or meta.get("method") or "lora"),
        train_loss=train_loss,
        eval_loss=eval_loss,
        created=str(meta.get("created") or ""),
        steps=int(steps or 0),
        total_steps=meta.get("total_steps"),
        error=meta.get("error"),
        metadata=meta,
        settings=settings,
    )


def _settings(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The run's settings: as recorded in the metadata, else read from its run.yaml."""
    settings = meta.get("settings")
    if isinstance(settings, dict) and settings:
        return settings
    if (run_dir / RUN_YAML).is_file():
        with contextlib.suppress(Exception):  # a broken run.yaml: the run is still listed
            from studio.config import RunConfig

            return RunConfig.load(run_dir / RUN_YAML).to_dict()
    return {}


def _base_model(
    run_dir: Path, meta: dict[str, Any], settings: dict[str, Any]
) -> tuple[str, str | None]:
    """(name, recorded folder) of the base: what training resolved, else what it was asked
    for, else what the adapter's config names; the folder when training recorded one."""
    base = meta.get("base_model")
    name = base.get("name") if isinstance(base, dict) else base
    path = (base.get("path") if isinstance(base, dict) else None) or meta.get("base_model_path")
    name = name or settings.get("base_model") or adapter_base(run_dir / ADAPTER)
    return str(name or path or ""), (str(path) if path else None)


def _last_losses(
    run_dir: Path, meta: dict[str, Any], status: str
) -> tuple[float | None, float | None, int | None]:
    """(train loss, eval loss, step): the final figures, else the log's last entries."""
    final = meta.get("final_metrics") or {}
    train_loss, eval_loss, steps = (final.get(k) for k in ("train_loss", "eval_loss", "step"))
    if status in ("running", "interrupted") or train_loss is None:
        curves = loss_curves(load_log(run_dir))
        if curves["train"]:
            steps, train_loss = curves["train"][-1]
        if curves["eval"]:
            eval_loss = curves["eval"][-1][1]
    return train_loss, eval_loss, steps


def list_runs(
    root: Path | None = None, *, with_adapter: bool = False, chattable: bool = False
) -> list[Run]:
    """Runs in the runs folder, newest first.

    `with_adapter`: only runs with a final adapter (what Export takes). `chattable`: only
    runs with an adapter to chat with, the final one or a checkpoint (Chat's picker).
    """
    root = root or paths.runs_dir()
    if not root.is_dir():
        return []
    found = [run for d in root.iterdir() if d.is_dir() and (run := _read_run(d))]
    if with_adapter:
        found = [r for r in found if r.has_adapter]
    if chattable:
        found = [r for r in found if is_adapter_dir(r.adapter_dir) or r.adapter_checkpoints]
    return sorted(found, key=lambda r: (r.created, r.name), reverse=True)
