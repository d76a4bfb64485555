"""The recipe sized to the model and the dataset: a preset band's defaults -> concrete settings.

A preset band (studio/hardware/presets.py) names the learning rate, LoRA shape and warmup for
its model sizes, and how long to train: `epochs` for an ordinary dataset, a floor of
`min_steps` optimizer steps (a 180-row sample at 1 epoch would take ~20 steps and learn
nothing), a `step_cap` (a 100k-row set at 3 epochs would over-train) and `max_epochs` (the
floor never repeats a tiny set without end). `plan_recipe` turns that into epochs, a step
count, a time estimate and one line that says why, for the Train tab and headless use alike.

The step count is the one the run will take (`recipe.plan_steps`, the trainer's own rule),
so the line never promises 60 steps for a run of 58.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from studio.config import RunConfig

# The RunConfig fields a plan fills where the user has not edited them. The LoRA shape comes
# from the same band through the Hardware tab (one writer per field).
# The dpo_* fields: DPO runs only.
PLAN_FIELDS = ("learning_rate", "epochs", "warmup_ratio", "dpo_beta", "dpo_sft_weight")
TARGET_WORDS = {
    "qv": "q/v",
    "attention": "attention",
    "attention_mlp": "attention+MLP",
    "all_linear": "all-linear",
}


@dataclass
class Plan:
    """Concrete settings for one model and dataset, the steps they give, and why."""

    settings: dict[str, Any]  # PLAN_FIELDS and the LoRA shape -> value, RunConfig names
    train_rows: int
    n_params: int
    steps_per_epoch: int
    total_steps: int
    limit: str  # "floor" (epochs raised), "cap" (epochs lowered), or "" (the band's epochs)
    seconds: float | None  # estimated training time; None when no throughput is known
    line: str  # e.g. "162 rows, 135M model: 3 epochs at lr 1e-3, all-linear r 16, ..."


def steps_per_epoch(train_rows: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass, counted as the trainer counts them (`recipe.plan_steps`)."""
    from studio.train.recipe import plan_steps

    cfg = RunConfig(batch_size=batch_size, grad_accum=grad_accum, epochs=1.0, max_steps=0)
    return plan_steps(cfg, max(1, math.ceil(train_rows / batch_size)))["steps_per_epoch"]


def sized_epochs(band: Any, per_epoch: int) -> tuple[float, str]:
    """The band's epochs, raised to reach min_steps or lowered to stay near step_cap.

    Raised epochs are whole numbers (the floor is a minimum, so rounding up is safe), never
    past max_epochs; lowered ones keep one decimal and never go under one pass.
    """
    epochs = float(band.epochs)
    if per_epoch * epochs < band.min_steps:
        raised = min(float(band.max_epochs), float(math.ceil(band.min_steps / per_epoch)))
        return max(raised, epochs), "floor"
    if per_epoch * epochs > band.step_cap:
        if getattr(band, "objective", "") == "dpo":  # DPO's cap may end inside the first pass
            return max(0.01, math.floor(100 * band.step_cap / per_epoch) / 100), "cap"
        lowered = max(1.0, math.floor(10 * band.step_cap / per_epoch) / 10)
        return min(lowered, epochs), "cap"
    return epochs, ""


def plan_recipe(
    band: Any,
    n_params: int,
    train_rows: int,
    batch_size: int,
    grad_accum: int,
    tokens_per_row: float | None = None,
    tokens_per_s: float | None = None,
) -> Plan:
    """The band's recipe for `train_rows` rows of a model of `n_params` parameters.

    `band` is a presets.BandDefaults (or anything with its recipe fields). The time estimate
    needs the mean tokens per row and a throughput (a measured one, else the band's own).
    """
    if train_rows < 1:
        raise ValueError("no training rows: load a dataset first")
    per_epoch = steps_per_epoch(train_rows, batch_size, grad_accum)
    epochs, limit = sized_epochs(band, per_epoch)
    total = max(1, math.ceil(per_epoch * epochs))
    settings = {
        "learning_rate": float(band.learning_rate),
        "epochs": epochs,
        "lora_r": int(band.lora_r),
        "lora_alpha": int(band.lora_alpha),
        "target_modules": band.target_modules,
        "warmup_ratio": float(band.warmup_ratio),
    }
    if getattr(band, "objective", "") == "dpo":
        settings["dpo_beta"] = float(band.dpo_beta)
        settings["dpo_sft_weight"] = float(band.dpo_sft_weight)
        if total * band.warmup_ratio < 1:  # a lone warmup step would train at rate 0
            settings["warmup_ratio"] = 0.0
    rate = tokens_per_s or getattr(band, "tokens_per_s", 0) or 0
    seconds = None
    if rate > 0 and tokens_per_row:
        rows_seen = total * batch_size * grad_accum
        seconds = rows_seen * tokens_per_row / rate
    plan = Plan(settings, train_rows, n_params, per_epoch, total, limit, seconds, "")
    plan.line = plan_line(plan)
    return plan


def plan_line(plan: Plan) -> str:
    """One line: rows, model size, epochs, lr, LoRA shape, steps, time, and the limit hit."""
    s = plan.settings
    targets = TARGET_WORDS.get(s["target_modules"], s["target_modules"])
    epochs = f"{s['epochs']:g} epoch" + ("" if s["epochs"] == 1 else "s")
    why = {
        "floor": " (raised so a small dataset gets enough steps)",
        "cap": " (lowered so a large dataset is not over-trained)",
    }.get(plan.limit, "")
    if "dpo_beta" in s:  # a DPO plan: its cap is the band's DPO step cap
        why = " (the preset's DPO step cap)" if plan.limit == "cap" else why
        epochs = f"DPO beta {s['dpo_beta']:g}, {epochs}"
    time = f", {duration_words(plan.seconds)} here" if plan.seconds is not None else ""
    return (
        f"{plan.train_rows} rows, {params_words(plan.n_params)} model: {epochs}{why} at lr "
        f"{lr_words(s['learning_rate'])}, {targets} r {s['lora_r']}, ~{plan.total_steps} steps"
        f"{time}"
    )


def lr_words(lr: float) -> str:
    """2e-4, 1.5e-3: short scientific notation, as learning rates are usually written."""
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def params_words(n_params: int) -> str:
    """135M, 1.5B, 8B: the way model sizes are usually written."""
    if n_params >= 1e9:
        return f"{n_params / 1e9:.1f}".rstrip("0").rstrip(".") + "B"
    return f"{round(n_params / 1e6)}M"


def duration_words(seconds: float) -> str:
    """'about 4 min', 'about 2.5 h', 'under a minute': an estimate, not a promise."""
    if seconds < 60:
        return "under a minute"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


def planned_fields(plan: Plan, edited: set[str] | frozenset[str]) -> dict[str, Any]:
    """The plan's PLAN_FIELDS values for the fields the user has not edited."""
    return {k: plan.settings[k] for k in PLAN_FIELDS if k not in edited and k in plan.settings}


# A DPO pair costs about this many times an SFT row of prompt + chosen: both answers forward
# and backward, and a no-grad reference forward of both. `python -m studio.bench dpo` on the
# 135M model, 2 cores (load 1.4), 2026-12-06: 0.85 s a step of 1 pair vs 0.78 s of 2 rows.
DPO_PAIR_COST = 2.2


def rows_per_batch(cfg: RunConfig) -> int:
    """Rows of the dataset in one device batch: DPO's pairs are two sequences each."""
    from studio.train.recipe import pairs_per_batch

    return pairs_per_batch(cfg.batch_size) if cfg.objective == "dpo" else cfg.batch_size


# --- pre-flight: what a run will do, before Start ----------------------------------------------


@dataclass
class Preflight:
    """What the Train tab shows before Start: rows left out, a max length, steps and time."""

    train_rows: int
    val_rows: int
    no_trained_token: int  # train rows cut before their reply at max_seq_len (left out)
    max_seq_len: int
    truncated: int  # train rows longer than max_seq_len
    suggested_max_len: int  # p99 of the lengths, rounded up to a multiple of 64
    truncated_at_suggested: int
    tokens_per_row: float  # mean, after truncation at max_seq_len
    steps: int  # the run's optimizer steps with the current settings
    seconds: float | None
    time_source: str  # where the throughput comes from, in words

    @property
    def kept_rows(self) -> int:
        return self.train_rows - self.no_trained_token

    def timed(self, cfg: RunConfig, tokens_per_s: float | None) -> Preflight:
        """Steps and time for `cfg` (its batch, accumulation, epochs) over the kept rows."""
        from studio.train.recipe import plan_steps

        per_batch = rows_per_batch(cfg)
        batches = max(1, math.ceil(self.kept_rows / per_batch))
        self.steps = plan_steps(cfg, batches)["total_steps"]
        rows_seen = self.steps * per_batch * cfg.grad_accum
        cost = DPO_PAIR_COST if cfg.objective == "dpo" else 1.0
        self.seconds = (
            rows_seen * self.tokens_per_row * cost / tokens_per_s if tokens_per_s else None
        )
        return self

    def lines(self) -> list[str]:
        """Plain sentences for the Train tab (markdown-safe)."""
        left_out = (
            f"{self.no_trained_token} row(s) would keep no trained token at max length "
            f"{self.max_seq_len}: they are left out"
            if self.no_trained_token
            else f"every row keeps at least one trained token at max length {self.max_seq_len}"
        )
        suggest = (
            f"suggested max length {self.suggested_max_len} (p99 of the token lengths, rounded"
            f" up): it truncates {self.truncated_at_suggested} row(s); now {self.truncated}"
            f" of {self.train_rows} are truncated at {self.max_seq_len}"
        )
        time = (
            f"about {duration_words(self.seconds).removeprefix('about ')} ({self.time_source})"
            if self.seconds is not None
            else f"no time estimate yet ({self.time_source})"
        )
        steps = f"{self.steps} optimizer steps on {self.train_rows} training rows, {time}"
        return [left_out, suggest, steps]


def suggested_max_len(lengths: list[int], multiple: int = 64) -> int:
    """p99 of the token lengths (nearest rank), rounded up to a multiple of 64 tokens."""
    if not lengths:
        return multiple
    ordered = sorted(lengths)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return max(multiple, math.ceil(p99 / multiple) * multiple)


# A run shorter than this is mostly start-up (loading, the first step's warm-up, the step-0
# eval): after two 1-step runs, their rate put a 6-minute run at "about 23 min".
MIN_RATE_STEPS = 10


def measured_tokens_per_s(base_model: str, device: str) -> float | None:
    """Tokens per second of the newest completed run of this model on this device that ran
    at least MIN_RATE_STEPS steps, or None.

    Timed from its first logged step to its last (`steady_step_s`), so the start-up is left
    out while the evals and checkpoints between steps stay in: it estimates wall time.
    """
    from studio import runs

    try:
        infos = runs.list_runs()
    except OSError:
        return None
    for info in infos:
        if info.status != "completed":
            continue
        meta = info.metadata
        same = (meta.get("base_model") or {}).get("name") == base_model
        if not same or (meta.get("device") or {}).get("used") != device:
            continue
        tokens = (meta.get("dataset") or {}).get("train_tokens")
        per_epoch = (meta.get("plan") or {}).get("steps_per_epoch")
        seconds = (meta.get("timings") or {}).get("train_s")
        steps = meta.get("total_steps")
        if not (tokens and per_epoch and seconds and steps) or steps < MIN_RATE_STEPS:
            continue
        step_s = steady_step_s(runs.load_log(info.path)) or seconds / steps
        return tokens / per_epoch / step_s
    return None


def steady_step_s(log: list[dict[str, Any]]) -> float | None:
    """Seconds per step between a run's first and last logged training step, or None."""
    train = [e for e in log if e.get("kind") == "train" and e.get("elapsed_s") is not None]
    if len(train) < 2 or train[-1]["step"] <= train[0]["step"]:
        return None
    return (train[-1]["elapsed_s"] - train[0]["elapsed_s"]) / (train[-1]["step"] - train[0]["step"])


def preflight(
    cfg: RunConfig, tokenizer: Any, tokens_per_s: float | None = None, source: str = ""
) -> Preflight:
    """Tokenize the run's training rows as training will, and say what the run will do.

    Reuses the run's own stages: the rows and split of `prepare`, the drop rule of
    `prepare.tokenize_rows`, the lengths of `data.tokens` and the step rule of `recipe`.
    The row figures are cached per dataset file and length settings, so a change of batch
    size in the Train tab does not tokenize a large dataset again.
    """
    from studio.train.prepare import dataset_file

    path = dataset_file(cfg)
    stat = path.stat()
    key = (
        str(path), stat.st_mtime_ns, stat.st_size, cfg.dataset_format, cfg.base_model,
        id(tokenizer), cfg.max_seq_len, cfg.val_fraction, cfg.seed, cfg.assistant_only_loss,
    )  # fmt: skip
    figures = _ROWS_CACHE.get(key)
    if figures is None:
        figures = _measure_rows(cfg, tokenizer)
        _ROWS_CACHE.clear()  # one dataset at a time: big ones are big
        _ROWS_CACHE[key] = figures
    time_source = source or "no throughput known yet: the first steps will tell"
    pf = Preflight(**figures, steps=0, seconds=None, time_source=time_source)
    return pf.timed(cfg, tokens_per_s)


_ROWS_CACHE: dict[tuple, dict[str, Any]] = {}


def _measure_rows(cfg: RunConfig, tokenizer: Any) -> dict[str, Any]:
    """The Preflight figures that depend on the rows only (not on batch, epochs or time)."""
    from studio.data.tokens import token_lengths
    from studio.train.prepare import load_training_rows, split_rows, tokenize_rows

    train, val = split_rows(load_training_rows(cfg), cfg.val_fraction, cfg.seed)
    kept, stats = tokenize_rows(tokenizer, train, cfg, required=False)
    lengths = token_lengths(train, tokenizer)
    suggested = suggested_max_len(lengths)
    per_row = sum(len(r["input_ids"]) for r in kept) / len(kept) if kept else 0.0
    return {
        "train_rows": len(train),
        "val_rows": len(val),
        "no_trained_token": stats["dropped"],
        "max_seq_len": cfg.max_seq_len,
        "truncated": sum(n > cfg.max_seq_len for n in lengths),
        "suggested_max_len": suggested,
        "truncated_at_suggested": sum(n > suggested for n in lengths),
        "tokens_per_row": round(per_row, 1),
    }


# --- the whole plan of one run config (the Train tab's pre-flight, headless too) ---------------


@dataclass
class RunPlan:
    """The settings a run config gets from its preset's plan, and what the run will do."""

    settings: dict[str, Any]  # PLAN_FIELDS the user did not edit -> planned value
    line: str  # the one-line why ("162 rows, 135M model: ..."), or why there is no plan
    preflight: Preflight | None
    problems: list[str]


def band_for_config(cfg: RunConfig) -> tuple[Any, int]:
    """The preset band for the run's model, and the model's parameter count (no network).

    Raises KeyError (unknown preset) or vram.ModelShapeError (unknown model shape).
    """
    from studio.hardware.presets import band_for, load_presets
    from studio.hardware.vram import model_shape

    preset = load_presets().get(cfg.preset)
    n_params = model_shape(cfg.base_model).n_params
    return preset.bands[band_for(n_params)], n_params


def throughput(cfg: RunConfig, band: Any) -> tuple[float | None, str]:
    """Tokens per second for the time estimate: a measured run of this model here, else the
    preset's figure, else none."""
    from studio.hardware.presets import load_presets

    try:
        kind = load_presets().get(cfg.preset).kind
    except KeyError:
        kind = "cpu"
    device = "cuda" if kind == "cuda" and cfg.device != "cpu" else "cpu"
    measured = measured_tokens_per_s(cfg.base_model, device)
    if measured:
        return measured, f"measured: {measured:.0f} tokens/s in your last run of this model"
    if band is not None and band.tokens_per_s:
        return float(band.tokens_per_s), f"the preset's {band.tokens_per_s:g} tokens/s"
    return None, "no run of this model here yet: the first steps will tell"


def plan_run(cfg: RunConfig, tokenizer: Any, edited: set[str] | frozenset[str] = frozenset()):
    """Plan `cfg` with its preset's band: the settings for fields not in `edited`, the line
    saying why, and the pre-flight measured with `tokenizer` (None: no pre-flight)."""
    problems: list[str] = []
    band, n_params = None, 0
    try:
        if not cfg.preset:
            raise KeyError("pick a hardware preset to size the recipe")
        band, n_params = band_for_config(cfg)
    except Exception as exc:  # no preset, unknown model shape: the fields stay as they are
        why = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        problems.append(f"no recipe plan: {' '.join(str(why).split())}")
    tps, source = throughput(cfg, band)
    pf = None
    if tokenizer is not None:
        try:
            pf = preflight(cfg, tokenizer, tps, source)
        except Exception as exc:  # a bad dataset is the Dataset tab's to explain
            problems.append(f"no pre-flight: {' '.join(str(exc).split())}")
    if band is None or pf is None or pf.kept_rows < 1:
        return RunPlan({}, "", pf, problems)
    if cfg.objective == "dpo":
        band = band.for_dpo()
    plan = plan_recipe(band, n_params, pf.kept_rows, rows_per_batch(cfg), cfg.grad_accum)
    planned = planned_fields(plan, edited)
    final = cfg.replace(**planned)
    pf.timed(final, tps)
    plan.settings = {k: getattr(final, k) for k in plan.settings}
    plan.total_steps, plan.seconds = pf.steps, pf.seconds
    if "epochs" in edited or final.max_steps > 0:
        plan.limit = ""
    return RunPlan(planned, plan_line(plan), pf, problems)
