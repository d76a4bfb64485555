"""Executing a prepared run: build, train, save, check, and record how it ended.

The last stage of the pipe `prepare -> recipe.build -> loop`. The run's record,
`recording(prepared)`, surrounds the stages after Start's checks: every event goes into
log.jsonl and the `on_event` callable, and however the run ends (completed, stopped, failed,
aborted) its metadata, model card and final event are written. Inside it, `train(live,
tokens)` takes prepare's tokenized rows, calls `recipe.build` once (model, LoRA, args,
trainer, step plan), trains, saves the adapter and checks that it learned
(`studio.train.checks`). It never calls back into `prepare`. Progress flows from a
TrainerCallback into the record; Stop sets an Event that the callback turns into
`control.should_training_stop`. Failures (out of memory, NaN loss, a full disk) end the run
as "failed" with concrete advice instead of taking the app down.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import shutil
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio import gpu, runs
from studio.config import ConfigError, RunConfig
from studio.data.chat_format import TemplateError
from studio.hardware import vram
from studio.models.precision import precision
from studio.train import checks, distributed, memory, recipe, tracking
from studio.util import exception_chain, short_error, write_errno

if TYPE_CHECKING:  # the shapes this stage receives; nothing of prepare runs here
    from studio.train.prepare import PreparedRun, Tokens

Event = dict[str, Any]
OnEvent = Callable[[Event], None]


class TrainingError(RuntimeError):
    """A run that cannot go on; `advice` says what to do, `retry` is a config dict to retry with."""

    def __init__(
        self, message: str, advice: list[str] | None = None, retry: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.advice = advice or []
        self.retry = retry


class _StopBeforeTraining(Exception):
    """Stop was pressed while the model was still loading."""


@dataclass
class TrainResult:
    """How a run ended, as plain data for the CLI and the UI."""

    run_dir: Path
    status: str  # completed, stopped, failed
    message: str
    advice: list[str] = field(default_factory=list)
    retry_config: dict[str, Any] | None = None
    final_metrics: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failed_at: float | None = None  # when it broke: which rank of a launched run broke first


@dataclass
class _Live:
    """One executing run: where its events go, its result so far, how long each part took."""

    run: PreparedRun
    stop: threading.Event
    on_event: OnEvent | None
    log_fh: Any
    result: TrainResult
    timings: dict[str, float] = field(default_factory=dict)
    t_start: float = field(default_factory=time.time)
    callback: Any = None  # the progress callback, once the trainer is built
    writes: bool = True  # False on DDP ranks > 0: only rank 0 writes the run folder

    def emit(self, entry: Event) -> None:
        """Append to log.jsonl and pass on to the caller (the UI's job, the CLI's printer)."""
        entry.setdefault("time", time.time())
        with contextlib.suppress(OSError):  # a full disk must not hide the real error
            runs.append_log(self.log_fh, entry)
        if self.on_event is not None:
            self.on_event(entry)

    def say(self, text: str) -> None:
        self.emit({"event": "message", "text": text})

    def check_stop(self) -> None:
        """Stop pressed while loading: end now, before training begins."""
        if self.stop.is_set():
            raise _StopBeforeTraining

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t = time.time()
        yield
        self.timings[key] = round(time.time() - t, 2)

    def release(self) -> None:
        """Drop the trainer's hook and references, and give the memory back."""
        if self.callback is not None and self.callback._hook is not None:
            self.callback._hook.remove()
        self.callback = None
        gpu.free_memory()


# --- running ------------------------------------------------------------------------------


@contextlib.contextmanager
def recording(
    run: PreparedRun, *, stop: threading.Event | None = None, on_event: OnEvent | None = None
) -> Iterator[_Live]:
    """The run's record around the stages after `prepare_run`: every event into log.jsonl and
    `on_event`, and however the run ends, its metadata, model card and final event.

    A failure inside is not raised on (the run ends with status failed, its advice said);
    Ctrl-C twice or SystemExit are recorded, then raised on."""
    writes = distributed.is_main()  # under `accelerate launch`, rank 0 alone writes the run
    live = _Live(
        run,
        stop or threading.Event(),
        on_event,
        runs.open_log(run.run_dir) if writes else open(os.devnull, "a", encoding="utf-8"),  # noqa: SIM115
        TrainResult(run.run_dir, "failed", ""),
        writes=writes,
    )
    card = gpu.card(run.cfg.gpu_index, run.device)  # "cuda:N": the card it trains on
    gpu_before = memory.gpu_bytes(card)  # the app's own there, given back at the end
    try:
        memory.refuse_if_broken(run.device)
        _announce(live)
        yield live
    except _StopBeforeTraining:
        live.result.status = "stopped"
        live.result.message = "Stopped before training began; no adapter saved."
    except BaseException as exc:  # a run must end with a status, whatever broke
        _explain_failure(live, exc)
        # The traceback holds the failed stages' frames, and with them the model and the
        # trainer: cleared, the memory comes back now rather than at some later collection.
        traceback.clear_frames(exc.__traceback__)
        if not isinstance(exc, Exception):  # Ctrl-C twice, SystemExit: record, then re-raise
            live.release()
            _finish(live)
            raise
    finally:
        live.release()
        run.meta.setdefault("memory", {}).update(memory.after_run(card, gpu_before))
    _finish(live)


def train(live: _Live, tokens: Tokens, extra_callbacks: Iterable[Any] = ()) -> None:
    """The run from prepare's tokens, in order: one `recipe.build`, train, save, check.
    The model and trainer live only in this frame."""
    run = live.run
    live.check_stop()
    base = tokens.base
    live.say(f"Loading model {base.name} ({run.cfg.method}) from {base.path}")
    live.callback = progress_callback(run, live.emit, live.stop)
    built = recipe.build(
        run.cfg, base.path, tokens.tokenizer, run.device, run.run_dir, tokens.train, tokens.val,
        resume=run.resume_from is not None, callbacks=[live.callback, *extra_callbacks],
    )  # fmt: skip
    live.timings["model_load_s"] = built.load_s
    live.check_stop()
    trainer = built.trainer
    _before_first_step(live, built)

    if not _already_trained(live, trainer):
        with live.timed("train_s"):
            trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    if live.callback.nan_step is not None:
        raise nan_error(run.cfg, live.callback.nan_step)

    if not live.writes:  # DDP ranks > 0: rank 0 saves and checks the adapter
        live.result.status = "stopped" if live.callback.stopped else "completed"
        return
    live.say("Saving the adapter")
    with live.timed("save_s"):
        save_adapter(trainer.model, tokens.tokenizer, run.run_dir)
    _record_success(live, trainer, tokens.tokenizer)


def _already_trained(live: _Live, trainer: Any) -> bool:
    """A resume from a checkpoint at the last step (the run was killed during its final save):
    load that checkpoint's adapter and state, and train no more.

    `trainer.train()` would take one more step before it checks max_steps (step 5 of 4), so
    the adapter saved would not be the one the run trained (tests/test_kill.py, `final`).
    """
    from transformers.trainer_callback import TrainerState

    ckpt = live.run.resume_from
    if ckpt is None:
        return False
    state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    if state.global_step < trainer.args.max_steps:
        return False
    live.callback.init_params = {  # the fresh adapter, for "adapter weights moved"
        n: p.detach().float().cpu().clone()
        for n, p in trainer.model.named_parameters()
        if p.requires_grad
    }
    trainer._load_from_checkpoint(str(ckpt))
    trainer.state = state
    live.say(
        f"{ckpt.name} is at the last step ({trainer.args.max_steps}): saving its adapter"
        " without training again"
    )
    return True


def _announce(live: _Live) -> None:
    """The run folder, the device and precision, and a warning when a GPU was meant."""
    run = live.run
    live.say(f"Run folder: {run.run_dir}")
    live.say(f"Device: {run.device_reason}; {precision(run.device).reason}")
    live.say(f"Curves: {tracking.tracking_note(run.cfg.wandb)}")  # says when W&B is skipped
    if run.expected_device == "cuda" and run.device != "cuda":
        live.say(
            f"WARNING: the preset '{run.cfg.preset}' expects a GPU, but PyTorch sees none: training"
            " runs on the CPU and will be very slow (is the CUDA build of torch installed?)"
        )


def _before_first_step(live: _Live, built: recipe.Built) -> None:
    """The step-0 eval deferred, the plan and recipe in the metadata, and the run's plan said."""
    run, cfg, trainer, plan = live.run, live.run.cfg, built.trainer, built.plan
    if built.args.eval_on_start:  # the step-0 eval must not hold back the first step
        built.args.eval_on_start = False
        live.callback.base_eval = functools.partial(base_eval, trainer)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    run.meta.update(total_steps=plan["total_steps"], plan=plan)
    run.meta["parameters"] = {"trainable": trainable, "total": total}
    run.meta["peft"] = {
        "target_modules": _jsonable(trainer.model.peft_config["default"].target_modules)
    }
    run.meta["recipe"] = built.summary
    lc = built.long_context
    options = lc.options if lc else vram.Options()
    run.meta["memory"] = vram.run_estimate(
        run.meta["base_model"]["path"], cfg, run.device, trainer.compact_head, options
    )
    for line in lc.lines() if lc else []:
        live.say(line)  # the options for long context, on or off, and why
    if live.writes:
        runs.write_metadata(run.run_dir, run.meta)
    batch = f"batch {cfg.batch_size}"
    if cfg.objective == "dpo":  # a pair is two sequences: the recipe halves the batch
        pairs = built.args.per_device_train_batch_size
        batch = f"DPO, {pairs} pair{'s' if pairs > 1 else ''} (chosen + rejected) per batch"
    live.say(
        f"Training {plan['total_steps']} steps: {batch} x accumulation "
        f"{cfg.grad_accum}, {trainable:,} trainable of {total:,} parameters"
        + (f", resuming from {run.resume_from.name}" if run.resume_from else "")
    )
    live.emit({"event": "status", "status": "training", "total_steps": plan["total_steps"]})
    live.say(f"First step (of {plan['total_steps']})")


def _record_success(live: _Live, trainer: Any, tok: Any) -> None:
    """A run that trained and saved: its status, final figures and checks (the answer checks
    generate on the trained model, after the adapter is safely saved)."""
    result, run = live.result, live.run
    step = trainer.state.global_step
    result.status = "stopped" if live.callback.stopped else "completed"
    run.meta.setdefault("memory", {}).update(vram.measured_peak(run.device))
    found = preference_checks(live, trainer) if run.cfg.objective == "dpo" else []
    result.final_metrics = checks.final_metrics(runs.load_log(run.run_dir), step)
    result.checks = checks.did_it_learn(
        runs.load_log(run.run_dir),
        live.callback.init_params,
        trainer.model,
        run.device,
        run.expected_device,
    )
    result.checks += found
    n_prompts, limit, why = answer_budget(run)
    live.say("Checking the answers: base vs fine-tune on a few validation prompts" + why)
    with live.timed("answer_checks_s"):
        answers = checks.answer_checks(
            trainer.model, tok, run.val_rows, run.train_rows, n_prompts, limit=limit
        )
    if why:  # the verdicts say they stand on fewer answers
        for check in answers["checks"]:
            check["detail"] += why
    result.checks += answers["checks"]
    run.meta["did_it_learn"] = {**run.meta.get("did_it_learn", {}), **answers["figures"]}
    result.warnings = [c["detail"] for c in result.checks if c["ok"] is False]
    result.message = (
        f"Stopped at step {step}; the adapter at that step is saved."
        if result.status == "stopped"
        else f"Completed {step} steps."
    )


def preference_checks(live: _Live, trainer: Any) -> list[checks.Check]:
    """A DPO run's held-out pairs, scored by the reference (the start) and the trained
    adapter: the checks, the figures into the metadata, and the eval loss at step 0 (ln 2:
    the policy starts as the reference) and now into the log, so the curve and "eval loss
    went down" read them like SFT's. Never raises (the adapter is saved already): a failure
    is an amber check."""
    from studio.train import dpo

    live.say("Scoring the held-out pairs: the start (reference) vs the trained adapter")
    try:
        with live.timed("preference_checks_s"):
            figures = dpo.preference_figures(trainer)
    except Exception as exc:
        detail = f"could not score the held-out pairs: {short_error(exc)}"
        return [checks.make_check("reward accuracy rose", "amber", detail)]
    live.run.meta["did_it_learn"] = {"preference": figures}
    if figures:
        step = trainer.state.global_step
        live.emit({"kind": "eval", "step": 0, "eval_loss": math.log(2), "reward_accuracy": 0.0})
        live.emit(
            {
                "kind": "eval",
                "step": step,
                "eval_loss": figures["eval_loss"],
                "reward_accuracy": figures["reward_accuracy"],
                "reward_margin": figures["reward_margin"],
            }
        )
    return checks.preference_checks(figures)


# 4-bit generation on the CPU goes through bitsandbytes' row-by-row gemv kernel (faster ones
# need the `kernels` package): after a 4-step QLoRA run of the 135M model on 2 busy cores
# (load ~6), the default checks (4 prompts, up to 96 new tokens, base and fine-tune) took 275 s,
# and 23 min were seen under more load. Their cost grows with prompts x tokens.
QUICK_CHECK_PROMPTS = 2  # still two answers per side to compare
QUICK_CHECK_TOKENS = 48  # answers that fit are picked first; the limit still covers them


def answer_budget(run: PreparedRun) -> tuple[int, int, str]:
    """Prompts and length limit of the answer checks, and why they are fewer ("" if not).

    A 4-bit base on the CPU gets 2 prompts with short answers (the limit rises to 1.5x the
    longest one chosen, so "it stops" is still judged on answers that fit)."""
    if run.cfg.method == "qlora" and run.device == "cpu":
        why = (
            f" ({QUICK_CHECK_PROMPTS} prompts with short answers: 4-bit generation on the CPU"
            " is slow)"
        )
        return QUICK_CHECK_PROMPTS, QUICK_CHECK_TOKENS, why
    return checks.SAMPLE_PROMPTS, checks.SAMPLE_TOKENS, ""


def _explain_failure(live: _Live, exc: BaseException) -> None:
    """Turn what broke into the result's message, advice and one-click retry config."""
    result, run = live.result, live.run
    result.failed_at = time.time()
    if isinstance(exc, TrainingError):
        result.message, result.advice, result.retry_config = str(exc), exc.advice, exc.retry
    elif isinstance(exc, ConfigError | TemplateError):
        result.message = f"Invalid setting or data: {exc}"
    elif not isinstance(exc, Exception):
        result.message = f"Aborted ({type(exc).__name__}); Resume continues from a checkpoint."
    elif memory.is_fatal_cuda_error(exc):
        result.message, result.advice = memory.mark_fatal(exc)
        live.emit({"event": "traceback", "text": traceback.format_exc()})
    elif is_out_of_memory(exc):
        result.message, result.advice, result.retry_config = oom_advice(run.cfg, run.device, exc)
    elif is_save_error(exc):
        result.message, result.advice = save_error_advice(exc, run.run_dir)
        live.emit({"event": "traceback", "text": traceback.format_exc()})
    else:
        result.message = f"Training failed: {short_error(exc)}"
        live.emit({"event": "traceback", "text": traceback.format_exc()})


def _finish(live: _Live) -> None:
    """Record how the run ended (metadata, model card, final event), then release the run."""
    run, result, meta = live.run, live.result, live.run.meta
    if not live.writes:  # DDP ranks > 0 leave the record to rank 0
        live.log_fh.close()
        return
    live.timings["total_s"] = round(time.time() - live.t_start, 2)
    meta.setdefault("timings", {}).update(live.timings)
    write_end(run.run_dir, meta, result)
    live.emit(finished_event(result))
    with contextlib.suppress(OSError):
        live.log_fh.close()
    runs.mark_done(run.run_dir)


def write_end(run_dir: Path, meta: dict[str, Any], result: TrainResult) -> None:
    """How the run ended, into its metadata and model card: the one record of every ending,
    written by the run's own process, or by the job that launched its ranks (`record_end`)."""
    if result.status in ("failed", "interrupted") and not result.final_metrics:
        result.final_metrics = checks.final_metrics(runs.load_log(run_dir), None)
    now = time.strftime("%Y-%m-%dT%H:%M:%S")  # as prepare's `now_iso`
    meta.update(
        status=result.status,
        updated=now,
        ended=now,
        final_metrics=result.final_metrics,
        checks=result.checks,
        warnings=result.warnings,
        error=result.message if result.status == "failed" else None,
        message=result.message,
        advice=result.advice,
        retry_config=result.retry_config,
    )
    try:
        runs.write_metadata(run_dir, meta)
        runs.atomic_write_text(run_dir / "README.md", checks.model_card(meta))
    except OSError as exc:
        result.warnings.append(f"could not write the run's metadata: {short_error(exc)}")


def finished_event(result: TrainResult) -> Event:
    """The log's last entry: what the Train tab and a job following the log show at the end."""
    return {
        "event": "finished",
        "status": result.status,
        "message": result.message,
        "advice": result.advice,
        "retry_config": result.retry_config,
        "checks": result.checks,
        "final_metrics": result.final_metrics,
    }


def record_end(run_dir: Path, result: TrainResult) -> Event | None:
    """End a launched run whose ranks are gone without recording it (a rank > 0 failed and
    rank 0 was killed, or the app closed): the same metadata, model card and final log entry
    as `_finish`. Never while some process still trains the run; returns the final entry."""
    if runs.is_live(run_dir):
        return None
    write_end(run_dir, runs.read_metadata(run_dir), result)
    entry = {**finished_event(result), "time": time.time()}
    with contextlib.suppress(OSError), contextlib.closing(runs.open_log(run_dir)) as fh:
        runs.append_log(fh, entry)
    return entry


def save_adapter(model: Any, tok: Any, run_dir: Path) -> Path:
    """Write adapter/ (PEFT weights + tokenizer) into a staging folder, then publish it
    (`runs.publish_adapter`): a crash mid-save never leaves a half-written adapter/."""
    runs.recover_adapter(run_dir)
    _, tmp, _ = runs.adapter_staging(run_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    runs.kill_point("final")
    tok.save_pretrained(str(tmp))
    return runs.publish_adapter(run_dir)


# --- progress -----------------------------------------------------------------------------


def memory_now(device: str) -> tuple[float, str]:
    """Peak GPU memory allocated, or the process's resident memory on CPU, in MiB."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "GPU peak allocated"
    import psutil

    return psutil.Process().memory_info().rss / 2**20, "process RSS"


def base_eval(trainer: Any) -> float:
    """The eval loss at step 0, computed later: a fresh LoRA adapter (lora_B = 0) leaves the
    base model's outputs unchanged, so the base model with the adapter switched off gives
    exactly the step-0 figure. Run at the first scheduled eval, it no longer holds back the
    first training step (Start -> first step shown)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    with model.disable_adapter():
        metrics = trainer.evaluate(metric_key_prefix="eval_step0")
    return float(metrics["eval_step0_loss"])


def progress_callback(run: PreparedRun, emit: OnEvent, stop: threading.Event) -> Any:
    """The run's TrainerCallback (`_Progress`), made here so that importing this module does
    not import transformers."""
    from transformers import TrainerCallback

    cls = type("ProgressCallback", (_Progress, TrainerCallback), {})
    return cls(run, emit, stop)


class _Progress:
    """Turns Trainer events into log.jsonl entries and events; honours Stop; spots NaN."""

    def __init__(self, run: PreparedRun, emit: OnEvent, stop: threading.Event) -> None:
        self.run, self.emit, self.stop = run, emit, stop
        self.device = run.device
        self.watts = run.power_w
        self.t0 = time.time()
        self._labels_counted = 0
        self._labels_pending: Any = None  # a device tensor, read only when logging
        self._tokens_at_log = 0
        self._step_time, self._step_t0 = 0.0, 0.0  # seconds inside optimizer steps, this window
        self.base_eval: Callable[[], float] | None = None  # the deferred step-0 eval
        self.peak_mb, self.mem_kind = 0.0, ""
        self.first_step = 0
        self.stopped = False
        self.nan_step: int | None = None
        self.init_params: dict[str, Any] = {}
        self._hook = None

    def _count_labels(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Counts trained tokens on the labels' device: `int()` here would make the host wait
        for the GPU on every micro-batch; the sum is read only when a log line is written."""
        labels = kwargs.get("labels")
        if module.training and labels is not None:
            n = (labels != -100).sum()
            self._labels_pending = n if self._labels_pending is None else self._labels_pending + n

    @property
    def label_tokens(self) -> int:
        if self._labels_pending is not None:
            self._labels_counted += int(self._labels_pending)
            self._labels_pending = None
        return self._labels_counted

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import torch

        self.t0 = time.time()
        self.first_step = state.global_step
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._count_labels, with_kwargs=True)
            # Kept to show at the end that training moved the adapter away from its start.
            self.init_params = {
                n: p.detach().float().cpu().clone()
                for n, p in model.named_parameters()
                if p.requires_grad
            }

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._step_time += time.perf_counter() - self._step_t0
        runs.kill_point(f"step{state.global_step}")  # after the update, before its checkpoint
        mb, self.mem_kind = memory_now(self.device)
        self.peak_mb = max(self.peak_mb, mb)
        if self.stop.is_set() and not self.stopped:
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True  # a checkpoint at the stop step, so Resume can go on
            self.emit(
                {
                    "event": "message",
                    "text": f"Stop requested: ending at step {state.global_step}",
                }
            )
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        now = time.time()
        elapsed = now - self.t0
        base = {"step": state.global_step, "total_steps": state.max_steps, "time": now}
        if "loss" in logs:
            loss = float(logs["loss"])
            # The window's rate over the time spent in its steps: the evals and checkpoint
            # saves between log lines do not drag the figure down (they are in the average).
            tps = (self.label_tokens - self._tokens_at_log) / max(self._step_time, 1e-6)
            self._tokens_at_log, self._step_time = self.label_tokens, 0.0
            done = max(state.global_step - self.first_step, 1)
            eta = elapsed / done * max(state.max_steps - state.global_step, 0)
            kwh = self.watts * elapsed / 3.6e6
            entry = {
                "kind": "train",
                **base,
                "epoch": round(float(state.epoch or 0), 4),
                "loss": loss,
                "learning_rate": float(logs.get("learning_rate", 0.0)),
                "grad_norm": _num(logs.get("grad_norm")),
                "tokens_per_s": round(tps, 1),
                # the run's real average so far: trained tokens over all the time since
                # training began (steps, evals, checkpoints, logging)
                "avg_tokens_per_s": round(self.label_tokens / max(elapsed, 1e-6), 1),
                "label_tokens": self.label_tokens,
                "elapsed_s": round(elapsed, 2),
                "eta_s": round(eta, 1),
                "peak_memory_mb": round(self.peak_mb, 1),
                "memory_kind": self.mem_kind,
                "power_w": self.watts,
                "energy_kwh": round(kwh, 6),
                "energy_cost": round(kwh * self.run.cfg.price_per_kwh, 6),
                **_reward_figures(logs, ""),
            }
            self.emit(entry)
            if not math.isfinite(loss) and self.nan_step is None:
                self.nan_step = state.global_step
                control.should_training_stop = True
                control.should_save = False  # a NaN adapter is not worth keeping
        if "eval_loss" in logs:
            if self.base_eval is not None:  # the step-0 figure first, so the curve starts at 0
                run_eval, self.base_eval = self.base_eval, None
                step0 = {**base, "step": 0, "eval_loss": run_eval()}
                self.emit({"kind": "eval", **step0})
            rewards = _reward_figures(logs, "eval_")
            self.emit({"kind": "eval", **base, "eval_loss": float(logs["eval_loss"]), **rewards})
        return control

    def on_save(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.emit({"event": "checkpoint", "step": state.global_step, "path": str(path)})
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return control


def _reward_figures(logs: dict[str, Any], prefix: str) -> dict[str, float]:
    """A DPO log line's reward accuracy and margin (TRL's `rewards/*`), when it has them."""
    keys = {"reward_accuracy": "rewards/accuracies", "reward_margin": "rewards/margins"}
    return {k: float(logs[prefix + v]) for k, v in keys.items() if prefix + v in logs}


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --- failures -----------------------------------------------------------------------------


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


_SAVE_FRAMES = {
    "_save_checkpoint",
    "_save_optimizer_and_scheduler",
    "_save_rng_state",
    "save_model",
    "save_pretrained",
    "save_adapter",
    "write_metadata",
}


def _in_save(exc: BaseException) -> bool:
    """Raised while a checkpoint or the adapter was being written."""
    for seen in exception_chain(exc):
        tb = seen.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name in _SAVE_FRAMES:
                return True
            tb = tb.tb_next
    return False


def is_save_error(exc: BaseException) -> bool:
    """A failure writing files: a write errno anywhere in the chain, or any error raised while
    a checkpoint or the adapter was being written (its advice then depends on the errno)."""
    return write_errno(exc) is not None or _in_save(exc)


def save_error_advice(exc: BaseException, run_dir: Path) -> tuple[str, list[str]]:
    """What failed while saving, and the advice for that cause: free space only for a full
    disk, the quota, the filesystem or the permissions otherwise, a bug report when no write
    failed at all."""
    kept = ", ".join(p.name for p in runs.checkpoints(run_dir)) or "none were saved yet"
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**30:.1f} GiB free on that disk"
    except OSError:
        free = "free space unknown"
    code = write_errno(exc)
    fix = {
        errno.ENOSPC: f"The disk holding {run_dir} is full: free disk space, then press Resume.",
        errno.EDQUOT: "Your disk quota there is used up: delete files you own on that disk or"
        " ask for a larger quota, then press Resume.",
        errno.EROFS: f"{run_dir} is on a read-only filesystem: start the studio with --data-dir"
        " on a writable disk and train again (this run cannot be saved in place).",
        errno.EACCES: f"Permission denied writing in {run_dir}: give your user write access to"
        " that folder (or use another --data-dir), then press Resume.",
    }.get(code)
    if fix is None and "write" in short_error(exc).lower():
        fix = (
            f"A file write failed without saying why: check free space ({free}), your quota"
            f" and the permissions of {run_dir}, then press Resume."
        )
    if fix is None:
        fix = (
            "No write failed (not a disk problem): the traceback is in the run's log.jsonl;"
            " please report it. Resume continues from the last checkpoint."
        )
    message = f"Saving failed: {short_error(exc)} ({free})."
    return message, [fix, f"Earlier checkpoints are kept: {kept}."]


def _retry_changes(cfg: RunConfig) -> tuple[dict[str, Any], list[str]]:
    """The memory-saving changes to cfg, leanest-first, each with the sentence saying it."""
    changes: dict[str, Any] = {}
    advice: list[str] = []
    if cfg.batch_size > 1:
        # Keep the effective batch (batch x accumulation): halve an even batch; an odd one
        # cannot be halved exactly, so go to 1 and multiply accumulation by the old batch.
        factor = 2 if cfg.batch_size % 2 == 0 else cfg.batch_size
        changes["batch_size"] = cfg.batch_size // factor
        changes["grad_accum"] = cfg.grad_accum * factor
        verb = "Halve the batch" if factor == 2 else "Lower the batch (odd, so not halved)"
        advice.append(
            f"{verb} ({cfg.batch_size} -> {changes['batch_size']}) and raise gradient"
            f" accumulation ({cfg.grad_accum} -> {changes['grad_accum']}): the same effective"
            f" batch of {cfg.batch_size * cfg.grad_accum}."
        )
    if cfg.method == "lora":
        changes["method"] = "qlora"
        advice.append("Switch to QLoRA: the 4-bit base needs about a quarter of the memory.")
    if cfg.max_seq_len > 256:
        changes["max_seq_len"] = max(256, cfg.max_seq_len // 2)
        advice.append(f"Shorten max length ({cfg.max_seq_len} -> {changes['max_seq_len']} tokens).")
    if not cfg.gradient_checkpointing:
        changes["gradient_checkpointing"] = True
        advice.append("Turn on gradient checkpointing (slower, much less activation memory).")
    return changes, advice


def oom_advice(
    cfg: RunConfig, device: str, exc: BaseException
) -> tuple[str, list[str], dict | None]:
    """What ran out, what to change, and a config with those changes for one-click retry.

    The retry config is offered only when it changes something: at the leanest settings a
    retry would rerun the same out-of-memory, so there is none, and the advice says why.
    """
    where = "GPU" if device == "cuda" else "system"
    changes, advice = _retry_changes(cfg)
    retry = {**cfg.to_dict(), **changes} if changes else None
    if retry is None:
        advice.append(
            "These settings are already the leanest (batch 1, QLoRA, max length <= 256, gradient"
            " checkpointing): pick a smaller base model, or shorten the longest rows."
        )
    message = f"Out of {where} memory during training ({short_error(exc)}). Memory was freed."
    if changes:
        message += " Retry changes: " + ", ".join(f"{k} {v}" for k, v in changes.items()) + "."
    return message, advice, retry


def _jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, set) else value


def nan_error(cfg: RunConfig, step: int) -> TrainingError:
    """The loss became NaN/inf: what to change, and a retry config with those changes."""
    return TrainingError(
        f"the training loss became NaN/inf at step {step}; run stopped",
        advice=[
            f"Lower the learning rate (e.g. {cfg.learning_rate / 10:g}).",
            "Keep gradient clipping on (max_grad_norm 1.0).",
            "On a GPU without bf16, fp16 can overflow: try QLoRA or a bf16-capable GPU.",
            "Check the dataset for empty or garbled rows.",
        ],
        retry={**cfg.to_dict(), "learning_rate": cfg.learning_rate / 10, "max_grad_norm": 1.0},
    )
