"""The training recipe: LoRA/QLoRA supervised fine-tuning of a chat model on chat messages.

Run headless (the Train tab runs the very same functions in a background thread):

    python -m studio.train RUN.yaml [--data-dir DIR]      # a new run from a run config
    python -m studio.train --resume RUN_DIR               # continue from its last checkpoint

It reads top to bottom: rows are loaded and split, each conversation is tokenized with
`studio.data.chat_format` (assistant turns and their end-of-turn token carry the loss), the base
model is loaded (NF4 4-bit for QLoRA), small `build_*` helpers make the LoRA and trainer
configs, TRL's SFTTrainer trains on length-grouped batches, and the run folder receives the
adapter, metadata, log and model card. Failures (out of memory, NaN loss, a full disk) end the
run as "failed" with concrete advice instead of taking the app down.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio import __version__, paths, runs
from studio.config import ConfigError, RunConfig
from studio.data.chat_format import TemplateError, template_hash, tokenize_conversation
from studio.data.load import SAMPLE_DATASET
from studio.models.loader import load_model
from studio.models.precision import precision

KEEP_CHECKPOINTS = 2
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}

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
class PreparedRun:
    """A run that passed every check that needs no model: its folder exists, data is read."""

    cfg: RunConfig
    run_dir: Path
    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    device: str
    device_reason: str
    resume_from: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)


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


# --- data ---------------------------------------------------------------------------------


def dataset_file(cfg: RunConfig) -> Path:
    """The file a run trains on: the configured one, or the bundled sample."""
    return Path(cfg.dataset_path).expanduser().resolve() if cfg.dataset_path else SAMPLE_DATASET


def load_training_rows(cfg: RunConfig) -> list[dict[str, Any]]:
    """Rows as {"messages": [...]} dicts, through the Dataset tab's own loader (every format,
    errors with line numbers), so training sees exactly what the Dataset tab validated."""
    from studio.data import load as data

    path = dataset_file(cfg)
    if not path.is_file():
        raise ConfigError("dataset_path", f"no such file: {path}")
    try:
        report = data.load_dataset_file(path, fmt=cfg.dataset_format)
    except data.DatasetError as exc:
        raise ConfigError("dataset_path", str(exc)) from exc
    if not report.rows:
        first = str(report.errors[0]) if report.errors else "no usable conversations"
        raise ConfigError("dataset_path", f"{path.name}: no usable rows ({first})")
    return [{"messages": row["messages"]} for row in report.rows]


def split_rows(
    rows: list[dict[str, Any]], val_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The seeded train/validation split, the same one the Dataset tab shows."""
    from studio.data.load import split_rows as dataset_split

    return dataset_split(rows, val_fraction, seed)


def file_sha256(path: Path) -> str:
    """The dataset file's hash, recorded in the run's metadata (same as the PII scan key)."""
    from studio.data.pii import file_sha256 as sha256_of

    return sha256_of(path)


def check_pii(cfg: RunConfig) -> int | None:
    """Refuse a dataset with unresolved PII findings unless the user confirmed (allow_pii)."""
    from studio.data.pii import unresolved_pii

    count = unresolved_pii(str(dataset_file(cfg)))
    if count and not cfg.allow_pii:
        raise ConfigError(
            "allow_pii",
            f"{count} possible personal-data finding(s) in {dataset_file(cfg).name} are unresolved:"
            " redact them in the Dataset tab, or confirm to train anyway (allow_pii: true)",
        )
    return count


def tokenize_rows(
    tok: Any, rows: list[dict[str, Any]], cfg: RunConfig, required: bool = True
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """input_ids + labels per row (-100 where no loss), with the one shared chat_format.

    Labels are built here, not by a collator, so pad == eos can never mask the end-of-turn
    token. Rows left with nothing to learn (truncated before the reply) are dropped.
    """
    out: list[dict[str, list[int]]] = []
    stats = {"rows": len(rows), "dropped": 0, "truncated": 0, "tokens": 0, "trained_tokens": 0}
    first_error = ""
    for row in rows:
        try:
            conv = tokenize_conversation(tok, row["messages"], cfg.max_seq_len)
        except TemplateError as exc:
            stats["dropped"] += 1
            first_error = first_error or str(exc)
            continue
        if cfg.assistant_only_loss:
            labels = [
                t if m else -100 for t, m in zip(conv.input_ids, conv.assistant_mask, strict=True)
            ]
        else:
            labels = list(conv.input_ids)
        if len(labels) < 2 or all(x == -100 for x in labels[1:]):
            stats["dropped"] += 1
            continue
        stats["truncated"] += int(conv.truncated)
        stats["tokens"] += len(conv.input_ids)
        stats["trained_tokens"] += sum(x != -100 for x in labels[1:])
        out.append({"input_ids": conv.input_ids, "labels": labels})
    if not out and rows and required:
        hint = first_error or f"every row was cut before its reply at max_seq_len={cfg.max_seq_len}"
        raise ConfigError("max_seq_len" if not first_error else "dataset_path", hint)
    return out, stats


# --- hardware -----------------------------------------------------------------------------


def resolve_device(cfg: RunConfig) -> tuple[str, str]:
    """The device to train on and why; refuses cuda when no GPU is visible."""
    import torch

    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ConfigError(
            "device",
            f"no CUDA GPU is visible to PyTorch ({torch.__version__}, {build}): pick 'cpu' or"
            " 'auto', or install the CUDA build of torch",
        )
    if cfg.device == "cpu":
        return "cpu", "cpu: chosen in the settings"
    if has_cuda:
        return "cuda", f"cuda: {torch.cuda.get_device_name(0)}"
    return "cpu", "cpu: no CUDA GPU visible to PyTorch"


def hardware_preset(cfg: RunConfig) -> Any | None:
    """The Hardware tab's preset named in the config (`studio.presets`), or None."""
    if not cfg.preset:
        return None
    try:
        from studio.hardware.presets import load_presets

        return load_presets().get(cfg.preset)
    except Exception:  # no presets module, or an unknown/broken preset: no estimate, no crash
        return None


def expected_device(cfg: RunConfig) -> str:
    """The device the user meant: set explicitly, or implied by the hardware preset."""
    if cfg.device != "auto":
        return cfg.device
    preset = hardware_preset(cfg)
    if preset is not None:
        return "cuda" if getattr(preset, "kind", "") == "cuda" else "cpu"
    return "any"


def board_power(cfg: RunConfig, device: str) -> tuple[float, str]:
    """Watts drawn while training (the preset's board power) and where the figure comes from."""
    preset = hardware_preset(cfg)
    watts = getattr(preset, "board_power_w", None)
    if watts:
        return float(watts), f"{watts:g} W board power of preset '{cfg.preset}'"
    if device == "cpu":
        return 0.0, "0 W: no board power known for CPU training (pick a hardware preset)"
    return 0.0, "0 W: pick a hardware preset to estimate electricity"


def memory_now(device: str) -> tuple[float, str]:
    """Peak GPU memory allocated, or the process's resident memory on CPU, in MiB."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20, "GPU peak allocated"
    import psutil

    return psutil.Process().memory_info().rss / 2**20, "process RSS"


def hardware_info(device: str) -> dict[str, Any]:
    import psutil
    import torch

    info: dict[str, Any] = {
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            native_bf16=precision("cuda").name == "bf16",
        )
    return info


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"lora-studio": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# --- model and configs --------------------------------------------------------------------


def load_base_model(cfg: RunConfig, model_path: Path, device: str):
    """The frozen base: 16-bit (the device's precision) for LoRA, NF4 4-bit for QLoRA."""
    import torch

    dtype = precision(device).torch_dtype
    model = load_model(
        model_path,
        device=device,
        dtype=dtype,
        four_bit=cfg.method == "qlora",
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.method == "qlora" and dtype == torch.float16:
        # fp16 only (cards without bf16): the classic recipe upcasts norms, embeddings and
        # lm_head to fp32 for stability. With bf16 that costs memory (2 GiB on an 8B model,
        # which the VRAM estimate does not count) and buys nothing; TRL no longer calls it.
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return model


# Module names per architecture family; the first group whose names all exist is used.
_QV_GROUPS = [("q_proj", "v_proj"), ("qkv_proj",), ("query_key_value",), ("Wqkv",), ("c_attn",)]
_ATTENTION_GROUPS = [
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Mistral, Qwen, Gemma
    ("qkv_proj", "o_proj"),  # Phi-3
    ("q_proj", "k_proj", "v_proj", "dense"),  # Phi-2
    ("query_key_value", "dense"),  # GPT-NeoX, Falcon
    ("Wqkv", "out_proj"),  # MPT, ModernBERT-style
    ("c_attn",),  # GPT-2 (its c_proj is shared with the MLP)
]
_MLP_GROUPS = [
    ("gate_proj", "up_proj", "down_proj"),
    ("gate_up_proj", "down_proj"),
    ("w1", "w2", "w3"),
    ("fc1", "fc2"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("c_fc", "c_proj"),
]


def linear_module_names(model: Any) -> set[str]:
    """Short names of the model's linear layers (4-bit ones included), lm_head left out."""
    names = set()
    for full, module in model.named_modules():
        if "Linear" in type(module).__name__ and not full.endswith("lm_head"):
            names.add(full.rsplit(".", 1)[-1])
    return names


def resolve_target_modules(model: Any, choice: str) -> list[str] | str:
    """Map qv / attention / attention_mlp / all_linear onto this model's layer names."""
    if choice == "all_linear":
        return "all-linear"  # PEFT's own: every linear layer but the output head
    names = linear_module_names(model)

    def first(groups: list[tuple[str, ...]]) -> list[str]:
        return next((list(g) for g in groups if set(g) <= names), [])

    targets = first(_QV_GROUPS if choice == "qv" else _ATTENTION_GROUPS)
    if choice == "attention_mlp":
        targets = sorted(set(targets) | set(first(_MLP_GROUPS)))
    if not targets:
        raise ConfigError(
            "target_modules",
            f"cannot find {choice} layers in this model (its linear layers: "
            f"{', '.join(sorted(names))}); pick all_linear",
        )
    return targets


def build_peft_config(cfg: RunConfig, model: Any):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=resolve_target_modules(model, cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def padding_free_ok(model: Any) -> bool:
    """Padding-free batches (rows concatenated, no mask) pay off only with flash attention.

    With SDPA or eager attention transformers must build a block-diagonal mask over the
    whole flattened batch, quadratic in its tokens; on CPU that measured 1.5x slower than
    length-grouped padded batches (the breakdown of `python -m studio.bench train`).
    """
    attn = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    return "flash" in attn


def build_training_args(
    cfg: RunConfig,
    run_dir: Path,
    device: str,
    has_eval: bool,
    resume: bool,
    padding_free: bool = False,
):
    """SFTConfig for one run. Step counts are placeholders until the data is prepared
    (see `plan_steps`); TRL defaults that differ from what a hobbyist expects are set here.

    Batches: packing when asked; else padding-free with flash attention (`padding_free_ok`);
    else rows of similar length batched together (length-grouped sampling), padded only to
    the longest row of their batch: a few percent of padding. The sampler puts the longest
    row in the first batch, so a run that will not fit in memory fails at its first step."""
    import torch
    from trl import SFTConfig

    dtype = precision(device).torch_dtype
    return SFTConfig(
        output_dir=str(run_dir / runs.CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs if cfg.epochs > 0 else 1.0,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else 1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # < 1 is read as a ratio of all steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optimizer,
        activation_checkpointing=cfg.gradient_checkpointing,  # TRL turns it on by default
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16,  # TRL defaults bf16 to True; on CPU this is autocast
        fp16=device == "cuda" and dtype == torch.float16,
        use_cpu=device == "cpu",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must reach the callback, not be averaged away
        eval_strategy="steps" if has_eval else "no",
        eval_steps=1,
        eval_on_start=has_eval and not resume,
        prediction_loss_only=True,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=KEEP_CHECKPOINTS,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
        # Whole rows (already truncated): padding-free or length-grouped; or packed blocks.
        padding_free=padding_free and not cfg.packing,
        train_sampling_strategy="random" if cfg.packing or padding_free else "group_by_length",
        packing=cfg.packing,
        max_length=cfg.max_seq_len if cfg.packing else None,
        # Labels come from chat_format's assistant mask; TRL must not rebuild them.
        assistant_only_loss=False,
        completion_only_loss=False,
    )


# Logit-scaling configs the compact CPU head leaves to TRL's own (which knows them all).
_SCALED_HEAD_KEYS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
HEAD_CHUNK_VALUES = 32 * 2**20  # logits per piece of the compact head (128 MiB in fp32)


def compact_head_ok(model: Any, device: str) -> bool:
    """Whether the loss may score only the label positions with plain torch ops (CPU).

    TRL's fused head scores only those positions with its Triton kernel on GPUs, but on CPU
    it scores every position (to keep tile shapes fixed for compilers) and folds each tile
    in Python-level ops: measured at about 40% of a CPU step. Models that scale or cap their
    logits keep TRL's head, which knows how.
    """
    if device != "cpu":
        return False
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not any(getattr(text, key, None) not in (None, 1.0) for key in _SCALED_HEAD_KEYS)


def head_loss_sum(hidden: Any, head: Any, targets: Any) -> Any:
    """Summed cross-entropy of `head(hidden)` against `targets` ([K, H] and [K]).

    In pieces of at most HEAD_CHUNK_VALUES logits, each recomputed in the backward pass
    instead of kept, so memory stays bounded for large vocabularies and many tokens.
    """
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def piece(h: Any, y: Any) -> Any:
        return F.cross_entropy(F.linear(h, head.weight, head.bias).float(), y, reduction="sum")

    n = max(1, HEAD_CHUNK_VALUES // head.weight.shape[0])
    if hidden.shape[0] <= n:
        return piece(hidden, targets)
    return sum(
        checkpoint(piece, hidden[i : i + n], targets[i : i + n], use_reentrant=False)
        for i in range(0, hidden.shape[0], n)
    )


def install_compact_head(model: Any) -> None:
    """Give the causal LM under `model` (PEFT or not) a `studio_compact_head=True` forward.

    Like TRL's `fused_lm_head`, it is a keyword of the model's own forward, so whatever hooks
    the model's forward (the progress callback's token count, tests' injected failures)
    still sees every training step. Installed once; other calls go to the original forward.
    """
    import functools

    import torch
    from transformers.modeling_outputs import CausalLMOutputWithPast

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(causal_lm, "_studio_compact_head", False):
        return
    inner = causal_lm.forward

    @functools.wraps(inner)
    def forward(*args: Any, studio_compact_head: bool = False, **kwargs: Any) -> Any:
        if not studio_compact_head:
            return inner(*args, **kwargs)
        labels = kwargs.pop("labels")[:, 1:]
        count = kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = causal_lm.base_model(*args, **kwargs).last_hidden_state
        mask = labels != -100
        head = causal_lm.get_output_embeddings()
        total = head_loss_sum(hidden[:, :-1][mask], head, labels[mask])
        count = mask.sum() if count is None else count
        # a batch without labels gives a zero loss, still connected to the model
        return CausalLMOutputWithPast(loss=total / torch.as_tensor(count).clamp(min=1))

    causal_lm.forward = forward
    causal_lm._studio_compact_head = True


def trainer_class():
    """SFTTrainer with a compact loss head on CPU (`compact_head_ok`); TRL's elsewhere.

    Defined lazily so importing this module does not import trl.
    """
    from trl import SFTTrainer

    class StudioSFTTrainer(SFTTrainer):
        compact_head = False  # set by run_training / the benchmark after construction

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self.compact_head or return_outputs or self.aux_loss_enabled:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            install_compact_head(self.accelerator.unwrap_model(model))
            outputs = model(
                **inputs, studio_compact_head=True, num_items_in_batch=num_items_in_batch
            )
            loss = outputs.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return loss

    return StudioSFTTrainer


def build_trainer(
    cfg: RunConfig,
    model: Any,
    tok: Any,
    args: Any,
    device: str,
    train_tok: list[dict[str, list[int]]],
    val_tok: list[dict[str, list[int]]] | None = None,
    callbacks: Iterable[Any] = (),
):
    """The studio's SFTTrainer on tokenized rows (`tokenize_rows`), LoRA from `cfg`, and the
    compact loss head where it applies (`compact_head_ok`)."""
    from datasets import Dataset

    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_tok),
        eval_dataset=Dataset.from_list(val_tok) if val_tok else None,
        processing_class=tok,
        peft_config=build_peft_config(cfg, model),
        callbacks=list(callbacks) or None,
    )
    trainer.compact_head = compact_head_ok(model, device)
    return trainer


def plan_steps(cfg: RunConfig, n_batches_per_epoch: int) -> dict[str, int]:
    """Total optimizer steps and the eval/checkpoint intervals (auto: ~5 evals, ~4 saves)."""
    per_epoch = max(1, math.ceil(n_batches_per_epoch / cfg.grad_accum))
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(per_epoch * cfg.epochs))
    return {
        "total_steps": total,
        "steps_per_epoch": per_epoch,
        "eval_steps": cfg.eval_steps or max(1, total // 5),
        "save_steps": cfg.save_steps or max(1, total // 4),
    }


# --- progress -----------------------------------------------------------------------------


def _progress_callback_class():
    """Defined lazily so importing this module does not import transformers."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """Turns Trainer events into log.jsonl entries and events; honours Stop; spots NaN."""

        def __init__(self, run: PreparedRun, emit: OnEvent, stop: threading.Event) -> None:
            self.run, self.emit, self.stop = run, emit, stop
            self.device = run.device
            self.watts, self.power_note = board_power(run.cfg, run.device)
            self.t0 = time.time()
            self.label_tokens = 0
            self._tokens_at_log, self._time_at_log = 0, time.time()
            self.peak_mb, self.mem_kind = 0.0, ""
            self.first_step = 0
            self.stopped = False
            self.nan_step: int | None = None
            self.init_params: dict[str, Any] = {}
            self._hook = None

        def _count_labels(self, module: Any, args: tuple, kwargs: dict) -> None:
            labels = kwargs.get("labels")
            if module.training and labels is not None:
                self.label_tokens += int((labels != -100).sum())

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            import torch

            self.t0 = self._time_at_log = time.time()
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

        def on_step_end(self, args, state, control, **kwargs):
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
                dt = max(now - self._time_at_log, 1e-6)
                tps = (self.label_tokens - self._tokens_at_log) / dt
                self._tokens_at_log, self._time_at_log = self.label_tokens, now
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
                    "label_tokens": self.label_tokens,
                    "elapsed_s": round(elapsed, 2),
                    "eta_s": round(eta, 1),
                    "peak_memory_mb": round(self.peak_mb, 1),
                    "memory_kind": self.mem_kind,
                    "power_w": self.watts,
                    "energy_kwh": round(kwh, 6),
                    "energy_cost": round(kwh * self.run.cfg.price_per_kwh, 6),
                }
                self.emit(entry)
                if not math.isfinite(loss) and self.nan_step is None:
                    self.nan_step = state.global_step
                    control.should_training_stop = True
                    control.should_save = False  # a NaN adapter is not worth keeping
            if "eval_loss" in logs:
                self.emit({"kind": "eval", **base, "eval_loss": float(logs["eval_loss"])})
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

    return ProgressCallback


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --- preparing a run (no model loaded yet) --------------------------------------------------


def prepare_run(cfg: RunConfig) -> PreparedRun:
    """Everything that can refuse a run before a model loads; then create its folder."""
    cfg = cfg.replace(
        dataset_path=str(Path(cfg.dataset_path).expanduser().resolve()) if cfg.dataset_path else ""
    )
    cfg.validate()
    device, reason = resolve_device(cfg)
    if device != "cuda" and cfg.optimizer != "adamw_torch":
        raise ConfigError("optimizer", f"{cfg.optimizer} needs a CUDA GPU; use adamw_torch on CPU")
    check_pii(cfg)
    rows = load_training_rows(cfg)
    train_rows, val_rows = split_rows(rows, cfg.val_fraction, cfg.seed)
    path = dataset_file(cfg)
    meta: dict[str, Any] = {
        "status": "running",
        "created": _now_iso(),
        "updated": _now_iso(),
        "pid": os.getpid(),
        "host": platform.node(),
        "run_name": cfg.run_name,
        "run_dir": "",
        "base_model": {"name": cfg.base_model},
        "dataset": {
            "path": str(path),
            "format": cfg.dataset_format,
            "sha256": file_sha256(path),
            "rows": len(rows),
            "train_rows": len(train_rows),
            "val_rows": len(val_rows),
        },
        "settings": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": package_versions(),
        "hardware": hardware_info(device),
        "device": {"used": device, "reason": reason, "expected": expected_device(cfg)},
        "adapter_dir": runs.ADAPTER,
        "error": None,
    }
    run_dir = runs.new_run_dir(cfg.run_name)
    meta["run_dir"] = str(run_dir)
    runs.mark_live(run_dir)  # released by execute_run, which must follow
    try:
        runs.atomic_write_text(run_dir / runs.RUN_YAML, cfg.to_yaml())
        runs.write_metadata(run_dir, meta)
    except BaseException:
        runs.mark_done(run_dir)
        raise
    return PreparedRun(cfg, run_dir, train_rows, val_rows, device, reason, None, meta)


def prepare_resume(run_dir: str | Path) -> PreparedRun:
    """Check a run can continue from its last complete checkpoint, with the same data."""
    run_dir = Path(run_dir).resolve()
    if not (run_dir / runs.RUN_YAML).is_file():
        raise ConfigError("run_dir", f"{run_dir} is not a run folder (no {runs.RUN_YAML})")
    meta = runs.read_metadata(run_dir)
    if runs.is_live(run_dir, meta):
        raise ConfigError("run_dir", f"{run_dir.name} is still training")
    if meta.get("status") == "completed":
        raise ConfigError("run_dir", f"{run_dir.name} already completed; start a new run instead")
    checkpoint = runs.latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(
            "run_dir", f"{run_dir.name} has no complete checkpoint to resume from; start it again"
        )
    cfg = RunConfig.load(run_dir / runs.RUN_YAML).validate()
    device, reason = resolve_device(cfg)
    path = dataset_file(cfg)
    rows = load_training_rows(cfg)
    recorded = (meta.get("dataset") or {}).get("sha256")
    if recorded and recorded != file_sha256(path):
        raise ConfigError(
            "dataset_path", f"{path} changed since the run began; Resume needs the same data"
        )
    train_rows, val_rows = split_rows(rows, cfg.val_fraction, cfg.seed)
    step = int(checkpoint.name.rsplit("-", 1)[1])
    meta.update(status="running", updated=_now_iso(), pid=os.getpid(), error=None, advice=None)
    meta.setdefault("resumes", []).append({"at": _now_iso(), "from_step": step})
    meta["device"] = {**(meta.get("device") or {}), "used": device, "reason": reason}
    runs.mark_live(run_dir)  # released by execute_run, which must follow
    try:
        runs.write_metadata(run_dir, meta)
        with contextlib.closing(runs.open_log(run_dir)) as fh:
            runs.append_log(fh, {"event": "resumed", "from_step": step, "time": time.time()})
    except BaseException:
        runs.mark_done(run_dir)
        raise
    return PreparedRun(cfg, run_dir, train_rows, val_rows, device, reason, checkpoint, meta)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# --- running ------------------------------------------------------------------------------


def execute_run(
    run: PreparedRun,
    *,
    stop: threading.Event | None = None,
    on_event: OnEvent | None = None,
    extra_callbacks: Iterable[Any] = (),
) -> TrainResult:
    """Load, train, save, check. Never raises for a training failure: returns status failed."""
    from studio.models.loader import load_tokenizer, resolve_model

    stop = stop or threading.Event()
    cfg, run_dir, meta = run.cfg, run.run_dir, run.meta
    t_start = time.time()
    timings: dict[str, float] = {}
    result = TrainResult(run_dir, "failed", "")
    log_fh = runs.open_log(run_dir)
    trainer = model = callback = tok = None

    def emit(entry: Event) -> None:
        entry.setdefault("time", time.time())
        with contextlib.suppress(OSError):  # a full disk must not hide the real error
            runs.append_log(log_fh, entry)
        if on_event is not None:
            on_event(entry)

    def say(text: str) -> None:
        emit({"event": "message", "text": text})

    def check_stop() -> None:
        if stop.is_set():
            raise _StopBeforeTraining

    try:
        say(f"Run folder: {run_dir}")
        say(f"Device: {run.device_reason}; {precision(run.device).reason}")
        if expected_device(cfg) == "cuda" and run.device != "cuda":
            say(
                f"WARNING: the preset '{cfg.preset}' expects a GPU, but PyTorch sees none: training"
                " runs on the CPU and will be very slow (is the CUDA build of torch installed?)"
            )
        resolved = resolve_model(cfg.base_model, lambda m, f: say(f"[model {f:.0%}] {m}"))
        before = (meta.get("base_model") or {}).get("revision")
        if run.resume_from and before and before != resolved.revision:
            say(
                f"WARNING: the base model changed since the run began"
                f" ({before} -> {resolved.revision})"
            )
        meta["base_model"] = {
            "name": resolved.name,
            "path": str(resolved.path),
            "source": resolved.source,
            "revision": resolved.revision,
        }
        tok = load_tokenizer(resolved.path)
        meta["chat_template"] = tok.chat_template
        meta["template_hash"] = template_hash(tok)
        runs.atomic_write_text(run_dir / "chat_template.jinja", tok.chat_template or "")

        t = time.time()
        train_tok, train_stats = tokenize_rows(tok, run.train_rows, cfg)
        val_tok, val_stats = tokenize_rows(tok, run.val_rows, cfg, required=False)
        timings["tokenize_s"] = round(time.time() - t, 2)
        meta["dataset"].update(
            train_examples=len(train_tok),
            val_examples=len(val_tok),
            dropped_rows=train_stats["dropped"] + val_stats["dropped"],
            truncated_rows=train_stats["truncated"] + val_stats["truncated"],
            train_tokens=train_stats["tokens"],
            trained_tokens=train_stats["trained_tokens"],
        )
        say(
            f"Tokenized {len(train_tok)} train / {len(val_tok)} validation conversations "
            f"({train_stats['trained_tokens']} trained tokens; "
            f"{train_stats['truncated']} truncated, {train_stats['dropped']} dropped)"
        )
        check_stop()

        t = time.time()
        say(f"Loading {resolved.name} ({cfg.method}) from {resolved.path}")
        model = load_base_model(cfg, resolved.path, run.device)
        timings["model_load_s"] = round(time.time() - t, 2)
        check_stop()

        from transformers import PrinterCallback

        args = build_training_args(
            cfg,
            run_dir,
            run.device,
            bool(val_tok),
            run.resume_from is not None,
            padding_free=padding_free_ok(model),
        )
        callback = _progress_callback_class()(run, emit, stop)
        trainer = build_trainer(
            cfg, model, tok, args, run.device, train_tok, val_tok, [callback, *extra_callbacks]
        )
        trainer.remove_callback(PrinterCallback)  # our callback logs; no raw dicts on stdout
        if cfg.method == "qlora" and run.device == "cpu" and not args.bf16:
            # TRL keeps QLoRA adapters in bf16 (the paper's GPU recipe); this CPU computes in fp32.
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        plan = plan_steps(cfg, len(trainer.get_train_dataloader()))
        # The step plan needs the prepared (maybe packed) data, so it is set after __init__;
        # the Trainer reads these when train() starts.
        trainer.args.max_steps = plan["total_steps"]
        trainer.args.eval_steps = plan["eval_steps"]
        trainer.args.save_steps = plan["save_steps"]
        meta.update(total_steps=plan["total_steps"], plan=plan)
        trainable, total = trainer.model.get_nb_trainable_parameters()
        meta["parameters"] = {"trainable": trainable, "total": total}
        meta["peft"] = {
            "target_modules": _jsonable(trainer.model.peft_config["default"].target_modules)
        }
        meta["recipe"] = {
            "precision": precision(run.device).reason,
            "batches": "packed"
            if cfg.packing
            else ("padding-free" if args.padding_free else "length-grouped, padded per batch"),
            "loss_head": "compact (label positions only)" if trainer.compact_head else "TRL fused",
        }
        runs.write_metadata(run_dir, meta)
        say(
            f"Training {plan['total_steps']} steps: batch {cfg.batch_size} x accumulation "
            f"{cfg.grad_accum}, {trainable:,} trainable of {total:,} parameters"
            + (f", resuming from {run.resume_from.name}" if run.resume_from else "")
        )
        emit({"event": "status", "status": "training", "total_steps": plan["total_steps"]})
        check_stop()

        t = time.time()
        trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
        timings["train_s"] = round(time.time() - t, 2)

        if callback.nan_step is not None:
            raise TrainingError(
                f"the training loss became NaN/inf at step {callback.nan_step}; run stopped",
                advice=[
                    f"Lower the learning rate (e.g. {cfg.learning_rate / 10:g}).",
                    "Keep gradient clipping on (max_grad_norm 1.0).",
                    "On a GPU without bf16, fp16 can overflow: try QLoRA or a bf16-capable GPU.",
                    "Check the dataset for empty or garbled rows.",
                ],
                retry={
                    **cfg.to_dict(),
                    "learning_rate": cfg.learning_rate / 10,
                    "max_grad_norm": 1.0,
                },
            )

        t = time.time()
        say("Saving the adapter")
        save_adapter(trainer.model, tok, run_dir)
        timings["save_s"] = round(time.time() - t, 2)
        result.status = "stopped" if callback.stopped else "completed"
        result.final_metrics = final_metrics(runs.load_log(run_dir), trainer.state.global_step)
        result.checks = did_it_learn(
            runs.load_log(run_dir), callback.init_params, trainer.model, run.device, cfg
        )
        result.warnings = [c["detail"] for c in result.checks if c["ok"] is False]
        result.message = (
            f"Stopped at step {trainer.state.global_step}; the adapter at that step is saved."
            if result.status == "stopped"
            else f"Completed {trainer.state.global_step} steps."
        )
    except _StopBeforeTraining:
        result.status, result.message = (
            "stopped",
            "Stopped before training began; no adapter saved.",
        )
    except TrainingError as exc:
        result.message, result.advice, result.retry_config = str(exc), exc.advice, exc.retry
    except (ConfigError, TemplateError) as exc:
        result.message = f"Invalid setting or data: {exc}"
    except BaseException as exc:  # a run must end with a status, whatever broke
        if not isinstance(exc, Exception):  # Ctrl-C twice, SystemExit: record, then re-raise
            result.message = f"Aborted ({type(exc).__name__}); Resume continues from a checkpoint."
            trainer = model = callback = None
            _free_memory()
            _finish(run, result, meta, timings, t_start, emit, log_fh)
            raise
        if is_out_of_memory(exc):
            result.message, result.advice, result.retry_config = oom_advice(cfg, run.device, exc)
        elif is_save_error(exc):
            result.message, result.advice = save_error_advice(exc, run_dir)
            emit({"event": "traceback", "text": traceback.format_exc()})
        else:
            result.message = f"Training failed: {_short(exc)}"
            emit({"event": "traceback", "text": traceback.format_exc()})
    finally:
        if callback is not None and callback._hook is not None:
            callback._hook.remove()
        trainer = model = callback = None
        _free_memory()
    _finish(run, result, meta, timings, t_start, emit, log_fh)
    return result


def _finish(
    run: PreparedRun,
    result: TrainResult,
    meta: dict[str, Any],
    timings: dict[str, float],
    t_start: float,
    emit: OnEvent,
    log_fh: Any,
) -> None:
    """Record how the run ended (metadata, model card, final event), then release the run."""
    if result.status == "failed" and not result.final_metrics:
        result.final_metrics = final_metrics(runs.load_log(run.run_dir), None)
    timings["total_s"] = round(time.time() - t_start, 2)
    meta.update(
        status=result.status,
        updated=_now_iso(),
        ended=_now_iso(),
        final_metrics=result.final_metrics,
        checks=result.checks,
        warnings=result.warnings,
        error=result.message if result.status == "failed" else None,
        message=result.message,
        advice=result.advice,
        retry_config=result.retry_config,
    )
    meta.setdefault("timings", {}).update(timings)
    try:
        runs.write_metadata(run.run_dir, meta)
        runs.atomic_write_text(run.run_dir / "README.md", model_card(meta))
    except OSError as exc:
        result.warnings.append(f"could not write the run's metadata: {_short(exc)}")
    emit(
        {
            "event": "finished",
            "status": result.status,
            "message": result.message,
            "advice": result.advice,
            "retry_config": result.retry_config,
            "checks": result.checks,
            "final_metrics": result.final_metrics,
        }
    )
    with contextlib.suppress(OSError):
        log_fh.close()
    runs.mark_done(run.run_dir)


def run_training(
    cfg: RunConfig,
    *,
    stop: threading.Event | None = None,
    on_event: OnEvent | None = None,
    extra_callbacks: Iterable[Any] = (),
) -> TrainResult:
    """A new run from a config, in the calling thread. ConfigError before any model loads."""
    return execute_run(
        prepare_run(cfg), stop=stop, on_event=on_event, extra_callbacks=extra_callbacks
    )


def resume_training(
    run_dir: str | Path,
    *,
    stop: threading.Event | None = None,
    on_event: OnEvent | None = None,
    extra_callbacks: Iterable[Any] = (),
) -> TrainResult:
    """Continue a stopped, failed or interrupted run from its last checkpoint to the end."""
    return execute_run(
        prepare_resume(run_dir), stop=stop, on_event=on_event, extra_callbacks=extra_callbacks
    )


# --- saving and checking ------------------------------------------------------------------


def save_adapter(model: Any, tok: Any, run_dir: Path) -> Path:
    """Write adapter/ (PEFT weights + tokenizer) via a temp folder, swapped in at the end."""
    final = run_dir / runs.ADAPTER
    tmp = run_dir / f".{runs.ADAPTER}.tmp"
    old = run_dir / f".{runs.ADAPTER}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def final_metrics(entries: list[Event], step: int | None) -> dict[str, Any]:
    train = [e for e in entries if e.get("kind") == "train"]
    evals = [e for e in entries if e.get("kind") == "eval"]
    last = train[-1] if train else {}
    return {
        "step": step if step is not None else last.get("step", 0),
        "train_loss": last.get("loss"),
        "first_train_loss": train[0]["loss"] if train else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "first_eval_loss": evals[0]["eval_loss"] if evals else None,
        "tokens_per_s": last.get("tokens_per_s"),
        "elapsed_s": last.get("elapsed_s"),
        "peak_memory_mb": last.get("peak_memory_mb"),
        "memory_kind": last.get("memory_kind"),
        "energy_kwh": last.get("energy_kwh"),
        "energy_cost": last.get("energy_cost"),
    }


def did_it_learn(
    entries: list[Event], init_params: dict[str, Any], model: Any, device: str, cfg: RunConfig
) -> list[dict[str, Any]]:
    """Three checks shown with the result: weights moved, loss fell, the intended device."""
    checks: list[dict[str, Any]] = []
    moved, total, biggest = 0, 0, 0.0
    for name, param in model.named_parameters():
        start = init_params.get(name)
        if start is None:
            continue
        total += 1
        delta = (param.detach().float().cpu() - start).abs().max().item()
        biggest = max(biggest, delta)
        moved += delta > 0
    checks.append(
        {
            "name": "adapter weights moved",
            "ok": total > 0 and moved == total,
            "detail": f"{moved} of {total} adapter tensors changed (max |Δ| {biggest:.2e})",
        }
    )
    losses = [e["loss"] for e in entries if e.get("kind") == "train"]
    if len(losses) >= 2:
        k = max(1, len(losses) // 3)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        checks.append(
            {
                "name": "loss went down",
                "ok": last < first,
                "detail": f"train loss {first:.3f} (first {k} logs) -> {last:.3f} (last {k})"
                + (
                    ""
                    if last < first
                    else ": it did not fall; try a higher learning rate or more steps"
                ),
            }
        )
    else:
        checks.append(
            {"name": "loss went down", "ok": None, "detail": "too few logged steps to tell"}
        )
    expected = expected_device(cfg)
    if expected == "cuda" and device != "cuda":
        detail = (
            "WARNING: a GPU was expected but training ran on the CPU"
            " (is the CUDA build of torch installed?)"
        )
        ok: bool | None = False
    elif expected in ("any", device):
        detail, ok = f"trained on {device}" + ("" if expected == "any" else " as intended"), True
    else:
        detail, ok = f"trained on {device} (the settings suggested {expected})", True
    checks.append({"name": "intended device", "ok": ok, "detail": detail})
    return checks


def model_card(meta: dict[str, Any]) -> str:
    """A README.md for the run folder: what was trained, on what, how well, how to load it."""
    s, base, data = meta.get("settings", {}), meta.get("base_model", {}), meta.get("dataset", {})
    fm, versions = meta.get("final_metrics") or {}, meta.get("versions") or {}
    checks = "\n".join(
        f"- {'✅' if c['ok'] else '⚠️' if c['ok'] is False else '•'} {c['name']}: {c['detail']}"
        for c in meta.get("checks") or []
    )
    rows = "\n".join(f"| {k} | {v} |" for k, v in s.items())
    return f"""# {meta.get("run_name", "run")}: LoRA adapter for {base.get("name", "?")}

Status: **{meta.get("status")}** · trained with LoRA Studio {versions.get("lora-studio", "")}

- Base model: `{base.get("name")}` ({base.get("source", "?")}, revision `{base.get("revision")}`)
- Method: {s.get("method")} · rank {s.get("lora_r")} · targets {s.get("target_modules")}
- Dataset: `{data.get("path")}` (sha256 `{str(data.get("sha256", ""))[:16]}`), \
{data.get("train_rows")} train / {data.get("val_rows")} validation rows
- Final train loss: {fm.get("train_loss")} · eval loss: {fm.get("eval_loss")} \
· steps: {fm.get("step")}
- Chat template hash: `{meta.get("template_hash")}` (the template is in `chat_template.jinja`)

## Did it learn?
{checks or "- not checked (the run did not finish)"}

## Use it
```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base.get("path") or base.get("name")}")
model = PeftModel.from_pretrained(base, "adapter")
tokenizer = AutoTokenizer.from_pretrained("adapter")
```

## Settings
| setting | value |
|---|---|
{rows}
"""


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


def is_save_error(exc: BaseException) -> bool:
    """A failure writing files: disk full / read-only / quota anywhere in the chain, or any
    error raised while a checkpoint or the adapter was being written (torch.save reports a
    full disk as a bare RuntimeError; a permission error there is an OSError)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _WRITE_ERRNOS:
            return True
        tb = seen.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name in _SAVE_FRAMES:
                return True
            tb = tb.tb_next
        seen = seen.__cause__ or seen.__context__
    return False


def save_error_advice(exc: BaseException, run_dir: Path) -> tuple[str, list[str]]:
    kept = ", ".join(p.name for p in runs.checkpoints(run_dir)) or "none were saved yet"
    try:
        free = f"{shutil.disk_usage(run_dir).free / 2**30:.1f} GiB free on that disk"
    except OSError:
        free = "free space unknown"
    message = f"Saving failed: {_short(exc)} ({free})."
    advice = [
        "Free disk space, or fix the run folder's permissions, then press Resume.",
        f"Earlier checkpoints are kept: {kept}.",
    ]
    return message, advice


def oom_advice(cfg: RunConfig, device: str, exc: BaseException) -> tuple[str, list[str], dict]:
    """What ran out, what to change, and a config with those changes for one-click retry."""
    where = "GPU" if device == "cuda" else "system"
    retry = cfg.to_dict()
    advice = []
    if cfg.batch_size > 1:
        retry["batch_size"] = max(1, cfg.batch_size // 2)
        retry["grad_accum"] = cfg.grad_accum * 2
        advice.append(
            f"Halve the batch ({cfg.batch_size} -> {retry['batch_size']}) and double gradient "
            f"accumulation ({cfg.grad_accum} -> {retry['grad_accum']}): same effective batch."
        )
    if cfg.method == "lora":
        retry["method"] = "qlora"
        advice.append("Switch to QLoRA: the 4-bit base needs about a quarter of the memory.")
    if cfg.max_seq_len > 256:
        retry["max_seq_len"] = max(256, cfg.max_seq_len // 2)
        advice.append(f"Shorten max length ({cfg.max_seq_len} -> {retry['max_seq_len']} tokens).")
    if not cfg.gradient_checkpointing:
        retry["gradient_checkpointing"] = True
        advice.append("Turn on gradient checkpointing (slower, much less activation memory).")
    if not advice:
        advice.append("Pick a smaller base model; these settings are already the leanest.")
    message = f"Out of {where} memory during training ({_short(exc)}). Memory was freed."
    return message, advice, retry


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, set) else value


# --- CLI ----------------------------------------------------------------------------------


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m studio.train", description="Fine-tune with LoRA/QLoRA from a run.yaml."
    )
    parser.add_argument("config", nargs="?", help="a run.yaml (RunConfig fields)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint"
    )
    parser.add_argument("--data-dir", help="where models/ and runs/ live (default ~/.lora-studio)")
    args = parser.parse_args(argv)
    if bool(args.config) == bool(args.resume):
        parser.error("give either RUN.yaml or --resume RUN_DIR")
    if args.data_dir:
        paths.set_data_dir(args.data_dir)
    stop = threading.Event()

    def on_sigint(_sig: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print("\nStopping at the next step (Ctrl-C again to abort)...", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        if args.resume:
            prepared = prepare_resume(args.resume)
        else:
            cfg = RunConfig.load(args.config)
            if cfg.dataset_path and not Path(cfg.dataset_path).expanduser().is_absolute():
                beside = Path(args.config).resolve().parent / cfg.dataset_path
                if not Path(cfg.dataset_path).exists() and beside.exists():
                    cfg = cfg.replace(dataset_path=str(beside))
            prepared = prepare_run(cfg)
    except ConfigError as exc:
        print(f"Invalid setting {exc}", file=sys.stderr)
        return 2
    print(f"Run folder: {prepared.run_dir}", flush=True)
    result = execute_run(prepared, stop=stop, on_event=_terminal_printer())
    print(f"\n{result.status.upper()}: {result.message}")
    for line in result.advice:
        print(f"  - {line}")
    for check in result.checks:
        mark = {True: "ok", False: "WARN", None: "?"}[check["ok"]]
        print(f"  [{mark}] {check['name']}: {check['detail']}")
    print(f"Run folder: {result.run_dir}")
    return 0 if result.status in ("completed", "stopped") else 1
