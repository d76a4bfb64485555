"""`python -m studio.bench uipath`: a run through the Train tab's job vs the studio recipe.

The same rows and settings as train's studio recipe, run through the JobManager as the Train
tab runs them (its evals, checkpoints, logging, and the UI's 1-second polling and chart
redraws emulated in-process), vs the studio recipe alone: label-bearing tokens/s, the ratio
(goal >= 0.8x), where the UI path's time went, the Train tab's final figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from studio.tools.common import load_average, machine, write_results
from studio.tools.train import bench_rows, run_interleaved

HELP = "a run through the Train tab's job vs the studio recipe"


class _Phases:
    """A TrainerCallback's clock of a run: time in optimizer steps, in evals, in checkpoint
    saves (each measured from the event before it to its own end; an eval logs its metrics
    before `on_evaluate`, so a log does not restart the clock)."""

    def __init__(self) -> None:
        self.spent = {"steps": 0.0, "evals": 0.0, "saves": 0.0}
        self.count = {"steps": 0, "evals": 0, "saves": 0}
        self.first_step_s = 0.0
        self._last = time.perf_counter()

    def mark(self, kind: str | None) -> None:
        now = time.perf_counter()
        if kind is not None:
            self.spent[kind] += now - self._last
            self.count[kind] += 1
            if kind == "steps" and self.count[kind] == 1:
                self.first_step_s = now - self._last
        self._last = now

    def callback(self) -> Any:
        from transformers import TrainerCallback

        phases = self

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                phases.mark(None)

            def on_step_end(self, args, state, control, **kw):
                phases.mark("steps")

            def on_evaluate(self, args, state, control, **kw):
                phases.mark("evals")

            def on_save(self, args, state, control, **kw):
                phases.mark("saves")

        return Clock()


def _poll_like_the_ui(stop: threading.Event, counts: dict[str, int]) -> None:
    """What the Train tab's 1-second timer does in the app's process: copy the snapshot and,
    when it changed, rebuild the progress text and (when its points changed) the loss figure,
    serialised as Gradio sends it."""
    from studio.plots import loss_figure
    from studio.train.jobs import get_manager

    seen, drawn = -1, ""
    while not stop.wait(1.0):
        snap = get_manager().snapshot()
        counts["polls"] += 1
        if snap.version == seen:
            continue
        seen = snap.version
        _ = "\n".join(snap.log_lines[-200:])
        curve = f"{snap.run_dir}:{len(snap.history)}"
        if curve != drawn:
            drawn = curve
            loss_figure({snap.run_name: snap.history}).to_json()
            counts["redraws"] += 1


def _ui_run(cfg: Any, poll: bool) -> tuple[Path, _Phases, dict[str, int]]:
    """One run through the JobManager (the Train tab's path), with the UI's polling."""
    from studio.train.jobs import get_manager

    phases, counts, stop = _Phases(), {"polls": 0, "redraws": 0}, threading.Event()
    poller = threading.Thread(target=_poll_like_the_ui, args=(stop, counts), daemon=True)
    if poll:
        poller.start()
    try:
        run_dir = get_manager().start(cfg, extra_callbacks=[phases.callback()])
        snap = get_manager().wait()
    finally:
        stop.set()
    if snap.state != "completed":
        raise RuntimeError(f"the UI-path run ended {snap.state}: {snap.message}")
    return run_dir, phases, counts


def run(args: argparse.Namespace) -> int:
    """The same rows and settings as `bench train`'s studio recipe, run through the
    JobManager as the Train tab runs them (the run's own eval, checkpoints and logging, the
    1-second polling), against the studio recipe alone: label-bearing tokens/s and where the
    rest of the time goes."""
    from studio import paths
    from studio.config import RunConfig
    from studio.models import loader as models
    from studio.train.prepare import resolve_device

    resolved = models.resolve_model(args.model)
    home = Path(tempfile.mkdtemp(prefix="lora-studio-bench-uipath-"))
    # the models already converted, not again; Windows without the right to make symlinks
    # goes without (the run names its base by folder, so it needs no models/ of its own)
    with contextlib.suppress(OSError):
        (home / "models").symlink_to(paths.models_dir(), target_is_directory=True)
    data = home / "rows.jsonl"
    data.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in bench_rows(args.rows))
    )
    paths.set_data_dir(home)
    cfg = RunConfig(
        run_name="uipath", base_model=str(resolved.path), dataset_path=str(data),
        max_seq_len=args.max_len, batch_size=args.batch, grad_accum=1,
        max_steps=args.steps + 1, learning_rate=2e-4, warmup_ratio=0.0, target_modules="qv",
        allow_pii=True,  # bench_rows are redacted already
    ).validate()  # fmt: skip
    print(
        f"UI-path benchmark: {resolved.name}, {args.rows} rows, max length {cfg.max_seq_len},"
        f" batch {cfg.batch_size}, {cfg.max_steps} steps, default eval/checkpoint/logging;"
        f" polling {'on' if args.poll else 'off'}; load {load_average()}",
        flush=True,
    )
    results: dict[str, Any] = {"machine": machine(), "load_average_at_start": load_average()}
    try:
        studio = run_interleaved(
            [{"cfg": cfg.to_dict(), "model_path": str(resolved.path), "rows": args.rows,
              "device": resolve_device(cfg)[0], "tmp": str(home),
              "data_dir": str(home), "key": "studio", "builder": "studio", "undo": {},
              "index": 0}], 1,
        )["studio"]  # fmt: skip
        results["studio_recipe"] = {k: v for k, v in studio.items() if k != "per_step"}
        run_dir, phases, counts = _ui_run(cfg, args.poll)
        results["ui_path"] = _ui_figures(run_dir, phases, counts)
    finally:
        paths.set_data_dir(None)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    ui, b = results["ui_path"], results["studio_recipe"]
    results["ratio"] = round(ui["labelled_tokens_per_s"] / b["labelled_tokens_per_s"], 2)
    print(
        f"studio recipe alone: {b['labelled_tokens_per_s']:.1f} label-bearing tokens/s;"
        f" UI path: {ui['labelled_tokens_per_s']:.1f} ({results['ratio']}x, goal >= 0.8x);"
        f" the Train tab's final figure {ui['shown_avg_tokens_per_s']} trained tokens/s"
    )
    print(
        f"UI path after step 1: {ui['wall_s']:.1f} s = steps {ui['steps_s']:.1f} s +"
        f" {ui['evals']} evals {ui['evals_s']:.1f} s + {ui['saves']} checkpoints"
        f" {ui['saves_s']:.1f} s + other {ui['other_s']:.1f} s; {counts['polls']} polls,"
        f" {counts['redraws']} chart redraws; load {load_average()}"
    )
    write_results(args, "uipath", results)
    return 0


def _ui_figures(run_dir: Path, phases: _Phases, counts: dict[str, int]) -> dict[str, Any]:
    """The UI-path run's throughput after its first step (the recipe's warm-up step is not
    counted either), from its own log, and where its time went."""
    from studio import runs

    log = runs.load_log(run_dir)
    train = [e for e in log if e.get("kind") == "train"]
    ends = [e["time"] for e in log if e.get("event") == "message" and "Saving" in e["text"]]
    wall = ends[-1] - train[0]["time"]
    labelled = train[-1]["label_tokens"] - train[0]["label_tokens"]
    steps_s = phases.spent["steps"] - phases.first_step_s
    rest = phases.spent["evals"] + phases.spent["saves"]
    return {
        "labelled_tokens_per_s": round(labelled / wall, 1),
        "shown_avg_tokens_per_s": train[-1].get("avg_tokens_per_s"),
        "wall_s": round(wall, 2),
        "steps_s": round(steps_s, 2),
        "evals": phases.count["evals"],
        "evals_s": round(phases.spent["evals"], 2),
        "saves": phases.count["saves"],
        "saves_s": round(phases.spent["saves"], 2),
        "other_s": round(wall - steps_s - rest, 2),
        **counts,
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=300, help="rows of varied length (300)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (20)")
    p.add_argument("--max-len", type=int, default=512, help="max sequence length (512)")
    p.add_argument("--batch", type=int, default=4, help="rows per step (4)")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--no-poll", dest="poll", action="store_false", help="no 1-second polling")
    p.add_argument("--keep", action="store_true", help="keep the run folder")
    p.add_argument("--json", help="also write the results to this JSON file")
