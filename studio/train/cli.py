"""The headless command: train from a run config, or continue a run, in a terminal.

    python -m studio.train RUN.yaml [--data-dir DIR]      # a new run from a run config
    python -m studio.train --resume RUN_DIR               # continue from its last checkpoint
    accelerate launch -m studio.train RUN.yaml            # the same run on every visible GPU


It runs the very same pipe as the Train tab, in this process: `studio.train.prepare`, then
`studio.train.jobs.execute_run` (prepare's tokens -> `recipe.build` -> the loop), with a
progress bar instead of the UI's plot. Ctrl-C asks
the run to stop at the next step (its adapter is saved); a second Ctrl-C aborts.
Under `accelerate launch` (or torchrun) with several processes, `studio.train.distributed`
runs it: rank 0 prepares and writes, every rank trains; a STOP file in the run folder stops
all ranks at the same step.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from studio import paths
from studio.config import ConfigError, RunConfig
from studio.train import distributed
from studio.train.jobs import execute_run
from studio.train.loop import Event, OnEvent, TrainResult
from studio.train.prepare import PreparedRun, prepare_resume, prepare_run


def _terminal_printer() -> OnEvent:
    """A tqdm progress bar for steps plus plain lines for messages."""
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def on_event(e: Event) -> None:
        if e.get("kind") == "train":
            if "bar" not in bar:
                bar["bar"] = tqdm(
                    total=e["total_steps"], initial=0, unit="step", dynamic_ncols=True
                )
            b = bar["bar"]
            b.update(e["step"] - b.n)
            b.set_postfix(loss=f"{e['loss']:.4f}", tok_s=f"{e['tokens_per_s']:.0f}")
        elif e.get("kind") == "eval":
            tqdm.write(f"step {e['step']}: eval loss {e['eval_loss']:.4f}")
        elif e.get("event") in ("message", "checkpoint"):
            tqdm.write(e.get("text") or f"checkpoint saved: {e.get('path')}")
        elif e.get("event") == "finished" and "bar" in bar:
            bar["bar"].close()

    return on_event


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m studio.train", description="Fine-tune with LoRA/QLoRA from a run.yaml."
    )
    parser.add_argument("config", nargs="?", help="a run.yaml (RunConfig fields)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint"
    )
    parser.add_argument("--data-dir", help="where models/ and runs/ live (default ~/.lora-studio)")
    return parser


def _stop_on_ctrl_c() -> threading.Event:
    """First Ctrl-C: stop at the next step (adapter saved); second: abort."""
    stop = threading.Event()

    def on_sigint(_sig: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print("\nStopping at the next step (Ctrl-C again to abort)...", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGINT, on_sigint)
    return stop


def _prepare(config: str | None, resume: str | None) -> PreparedRun:
    """The prepared run; a dataset path relative to the YAML file is found beside it."""
    if resume:
        return prepare_resume(resume)
    assert config is not None
    cfg = RunConfig.load(config)
    if cfg.dataset_path and not Path(cfg.dataset_path).expanduser().is_absolute():
        beside = Path(config).resolve().parent / cfg.dataset_path
        if not Path(cfg.dataset_path).exists() and beside.exists():
            cfg = cfg.replace(dataset_path=str(beside))
    return prepare_run(cfg)


def _print_result(result: TrainResult) -> None:
    print(f"\n{result.status.upper()}: {result.message}")
    for line in result.advice:
        print(f"  - {line}")
    if result.checks:
        print("Did it learn?")
    for check in result.checks:  # verdicts, what to change, the example pair (checks.py)
        verdict = check.get("verdict") or {True: "green", False: "red"}.get(check["ok"], "n/a")
        print(f"  [{verdict}] {check['name']}: {check['detail']}")
        if check.get("fix") and verdict in ("amber", "red"):
            print(f"      -> {check['fix']}")
        for side, text in (check.get("example") or {}).items():
            print(f"      {side}: {' '.join(str(text).split())}")
    print(f"Run folder: {result.run_dir}")


def _main_launched(config: str | None, resume: str | None, request: threading.Event) -> int:
    """Under `accelerate launch`: rank 0 prepares, every rank trains (studio.train.distributed).

    `request` is this rank's Ctrl-C; the ranks stop on `agreed`, which the stop callback sets
    on all of them at the same step."""
    w = distributed.world()
    backend = distributed.init_group(cpu=distributed.wants_cpu(config, resume))
    payload = _prepare_on_main(config, resume, w, backend) if w.main else None
    payload = distributed.share(payload)
    if isinstance(payload, str):  # rank 0 refused the run: every rank exits
        if w.main:
            print(payload, file=sys.stderr)
        distributed.close_group()
        return 2
    prepared = distributed.for_this_rank(payload, w)
    if w.main:
        print(f"Run folder: {prepared.run_dir}", flush=True)
        print(f"{w.size} processes ({backend}); effective batch {prepared.meta['effective_batch']}")
    agreed = threading.Event()
    result = execute_run(
        prepared,
        stop=agreed,
        on_event=_terminal_printer() if w.main else None,
        extra_callbacks=[distributed.stop_callback(prepared.run_dir, request, agreed)],
    )
    if result.status == "failed":  # the job reads which rank broke first, and why
        print(distributed.failure_line(w.rank, result), flush=True)
    if w.main:
        distributed.clear_stop(prepared.run_dir)
        _print_result(result)
    distributed.close_group()
    return 0 if result.status in ("completed", "stopped") else 1


def _prepare_on_main(
    config: str | None, resume: str | None, w: distributed.World, backend: str
) -> PreparedRun | str:
    """Rank 0: the prepared run, or why it was refused (a string every rank receives: the
    others wait for it in `share`, so rank 0 must answer whatever happens)."""
    try:
        prepared = _prepare(config, resume)
    except ConfigError as exc:
        return f"Invalid setting {exc}"
    except Exception as exc:
        return f"Could not prepare the run: {type(exc).__name__}: {exc}"
    distributed.clear_stop(prepared.run_dir)
    distributed.record(prepared, w, backend)
    distributed.write_fsdp_config(prepared.run_dir, prepared.cfg.base_model, w.size)
    try:  # fetch or convert the base model once, before the other ranks look for it
        from studio.models.loader import resolve_model

        resolve_model(prepared.cfg.base_model)
    except Exception:
        pass  # each rank's loader then reports the failure in the run's log
    return prepared


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.resume):
        parser.error("give either RUN.yaml or --resume RUN_DIR")
    if args.data_dir:
        paths.set_data_dir(args.data_dir)
    stop = _stop_on_ctrl_c()
    if distributed.launched():
        return _main_launched(args.config, args.resume, stop)
    try:
        prepared = _prepare(args.config, args.resume)
    except ConfigError as exc:
        print(f"Invalid setting {exc}", file=sys.stderr)
        return 2
    print(f"Run folder: {prepared.run_dir}", flush=True)
    result = execute_run(prepared, stop=stop, on_event=_terminal_printer())
    _print_result(result)
    return 0 if result.status in ("completed", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
