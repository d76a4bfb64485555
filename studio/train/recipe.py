"""The training recipe: LoRA/QLoRA supervised fine-tuning of a chat model on tokenized rows.

It reads top to bottom, in small `build_*` helpers and no trainer hierarchy: the frozen base
model (16-bit, or NF4 4-bit for QLoRA, through `studio.models.loader`), the LoRA config, the
SFTConfig, and the studio's SFTTrainer with its compact CPU loss head. A run's loop gets all
of it from one call, `build(...)`, which returns the trainer with its step plan set. The
benchmark (`studio.bench`), the tests and the VRAM calibration (`studio.hardware.calibrate`)
train through the same `build_trainer`, so they measure one recipe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio import gpu, runs
from studio.config import ConfigError, RunConfig
from studio.hardware.longctx import LongContext, for_run
from studio.hardware.vram import HEAD_CHUNK_VALUES
from studio.models.loader import load_model
from studio.models.precision import precision
from studio.train import distributed, fused_loss, heads, tiled_mlp, tracking

KEEP_CHECKPOINTS = 2


# --- the base model and LoRA ---------------------------------------------------------------


def load_base_model(cfg: RunConfig, model_path: Path, device: str):
    """The frozen base: 16-bit (the device's precision) for LoRA, NF4 4-bit for QLoRA."""
    import torch

    device = gpu.card(cfg.gpu_index, device)
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


def starting_adapter(cfg: RunConfig, model: Any) -> tuple[Any, Any]:
    """(model, peft_config) for a trainer: a fresh LoRA from `cfg`, or the adapter of the
    finished run named in `init_adapter`, loaded trainable (the trainer then gets no
    peft_config). The run's metadata records which (`prepare._new_run_meta`)."""
    if not cfg.init_adapter:
        return model, build_peft_config(cfg, model)
    from peft import PeftModel

    folder = Path(cfg.init_adapter).expanduser() / runs.ADAPTER
    return PeftModel.from_pretrained(model, str(folder), is_trainable=True), None


# --- training arguments --------------------------------------------------------------------


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
    long_context: LongContext | None = None,
):
    """SFTConfig for one run. Step counts are placeholders until the data is prepared
    (see `plan_steps`); TRL defaults that differ from what a hobbyist expects are set here.

    Batches: packing when asked; else padding-free with flash attention (`padding_free_ok`);
    else rows of similar length batched together (length-grouped sampling), padded only to
    the longest row of their batch: a few percent of padding. The sampler puts the longest
    row in the first batch, so a run that will not fit in memory fails at its first step.

    `long_context` (`studio.hardware.longctx`): TRL's activation offloading and Liger's layer
    kernels, as chosen for the run; None: both off."""
    from trl import SFTConfig

    args = SFTConfig(
        **common_arguments(cfg, run_dir, device, has_eval, resume),
        activation_checkpointing=cfg.gradient_checkpointing,  # TRL turns it on by default
        activation_checkpointing_kwargs={"use_reentrant": False},
        # Whole rows (already truncated): padding-free or length-grouped; or packed blocks.
        padding_free=padding_free and not cfg.packing,
        train_sampling_strategy="random" if cfg.packing or padding_free else "group_by_length",
        packing=cfg.packing,
        max_length=cfg.max_seq_len if cfg.packing else None,
        # Labels come from chat_format's assistant mask; TRL must not rebuild them.
        assistant_only_loss=False,
        completion_only_loss=False,
        **long_context_arguments(long_context),
    )
    if device == "cuda" and not distributed.launched():  # DDP: accelerate gives each rank its card
        pin_to_one_gpu(args, cfg.gpu_index)
    return args


def long_context_arguments(long_context: LongContext | None) -> dict[str, bool]:
    """The long-context options as SFTConfig and DPOConfig spell them (both have them)."""
    return {
        "activation_offloading": bool(long_context and long_context.offload.on),
        # Layer kernels only: TRL 1.16 keeps its fused LM head and turns Liger's FLCE off.
        "use_liger_kernel": bool(long_context and long_context.liger.on),
    }


def long_context_callbacks(long_context: LongContext | None) -> list[Any]:
    """The trainer callbacks the long-context options need: the tiled MLP is installed as
    training begins, once Liger has patched the MLPs (`Trainer.train` does that)."""
    return [tiled_mlp.callback()] if long_context and long_context.tiled.on else []


def common_arguments(
    cfg: RunConfig, run_dir: Path, device: str, has_eval: bool, resume: bool
) -> dict[str, Any]:
    """The TrainingArguments every objective shares (SFTConfig here, DPOConfig in
    `studio.train.dpo`): batches, schedule, precision, logging, evals and checkpoints."""
    import torch

    dtype = precision(gpu.card(cfg.gpu_index, device)).torch_dtype
    return dict(
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
        # Under `accelerate launch` (DDP): every LoRA weight takes part in each forward, so
        # DDP need not search the graph for unused ones after every backward.
        ddp_find_unused_parameters=False,
        data_seed=cfg.seed,
        report_to=tracking.report_to(cfg.wandb),  # TensorBoard always; W&B when set up and ticked
        run_name=run_dir.name,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda",
    )


def pin_to_one_gpu(args: Any, index: int) -> None:
    """Train on card `index` only. TrainingArguments counts every visible GPU (n_gpu =
    device_count) and always picks cuda:0: on a PC with two cards the Trainer then wraps the
    model, which device_map put on one card, in DataParallel and SFTTrainer fails at start
    (a 4-bit model cannot be replicated at all). One card, the chosen one, is what runs."""
    import torch

    args._n_gpu = 1  # what Trainer itself sets for a model it must not replicate
    if index:
        torch.cuda.set_device(index)  # for kernels that use the thread's current card
        args.__dict__["_setup_devices"] = torch.device("cuda", index)  # args.device, cached
        # accelerate's device is "cuda" with no index, and its check on a 4-bit model
        # (Accelerator.prepare_model) then refuses one that sits on cuda:N: name the card.
        from accelerate import PartialState

        PartialState(cpu=False).device = torch.device("cuda", index)


# --- the compact CPU loss head --------------------------------------------------------------

# Logit-scaling configs the compact CPU head leaves to TRL's own (which knows them all).
_SCALED_HEAD_KEYS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def compact_head_ok(model: Any, device: str) -> bool:
    """Whether the loss may score only the label positions with plain torch ops: on CPU,
    and on a GPU where TRL's Triton path is unavailable (`detect.triton_ready`).

    TRL's fused head scores only those positions with its Triton kernel on GPUs, but on CPU
    it scores every position (to keep tile shapes fixed for compilers) and folds each tile
    in Python-level ops: measured at about 40% of a CPU step. Models that scale or cap their
    logits keep TRL's head, which knows how.
    """
    from studio.hardware.detect import compact_head_on

    if not compact_head_on(device):
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
    """Give the causal LM under `model` (PEFT or not) a `studio_compact_head=True` forward
    (`heads.install_head`): the loss over the label positions only, by `head_loss_sum`."""
    heads.install_head(model, "studio_compact_head", _compact_loss)


def _compact_loss(causal_lm: Any, hidden: Any, labels: Any, count: Any) -> Any:
    import torch
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = labels[:, 1:]
    mask = labels != -100
    total = head_loss_sum(hidden[:, :-1][mask], causal_lm.get_output_embeddings(), labels[mask])
    count = mask.sum() if count is None else count
    # a batch without labels gives a zero loss, still connected to the model
    return CausalLMOutputWithPast(loss=total / torch.as_tensor(count).clamp(min=1))


# --- the trainer and its step plan ----------------------------------------------------------


class CheckpointKillPoint:
    """Mixed into the studio's trainers: tests/test_kill.py kills a run here, with a
    checkpoint's weights and optimizer written and its trainer_state.json not yet."""

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        runs.kill_point(f"checkpoint-{self.state.global_step}")


def trainer_class():
    """SFTTrainer with a compact loss head on CPU (`compact_head_ok`); TRL's elsewhere.

    Defined lazily so importing this module does not import trl.
    """
    from trl import SFTTrainer

    class StudioSFTTrainer(CheckpointKillPoint, SFTTrainer):
        compact_head = False  # set by build_trainer; the benchmark may turn it off

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Evaluation asks for outputs, but with prediction_loss_only it keeps just the
            # loss: the compact head serves it too (TRL's head there scored every position
            # and added accuracy/entropy metrics: an eval pass cost more than a train step).
            eval_loss_only = (
                return_outputs and not model.training and self.args.prediction_loss_only
            )
            if not self.compact_head and not return_outputs and fused_loss.applies(self):
                return fused_loss.loss_without_syncs(self, model, inputs, num_items_in_batch)
            if (
                not self.compact_head
                or (return_outputs and not eval_loss_only)
                or self.aux_loss_enabled
            ):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            install_compact_head(self.accelerator.unwrap_model(model))
            outputs = model(
                **inputs, studio_compact_head=True, num_items_in_batch=num_items_in_batch
            )
            loss = outputs.loss
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

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
    """The studio's SFTTrainer on tokenized rows (`studio.train.prepare.tokenize_rows`), LoRA
    from `cfg`, and the compact loss head where it applies (`compact_head_ok`).

    The validation rows are evaluated shortest first: the eval loader batches them in order
    (training's length grouping does not reach it), and rows of mixed lengths padded to the
    longest in each batch wasted about a quarter of an eval (`python -m studio.bench uipath`).
    Every eval of a run sees the same batches, so its figures stay comparable."""
    from datasets import Dataset

    val_tok = sorted(val_tok or [], key=lambda row: len(row["input_ids"]))
    model, peft_config = starting_adapter(cfg, model)
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_tok),
        eval_dataset=Dataset.from_list(val_tok) if val_tok else None,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=list(callbacks) or None,
    )
    trainer.compact_head = compact_head_ok(model, device)
    tracking.point_tensorboard_at(trainer, Path(args.output_dir).parent)  # <run>/tensorboard
    if adapters_need_fp32(cfg, args):
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return trainer


# --- DPO: preference pairs (README "Preference tuning"; its computations in `dpo.py`) ------
#
# No `ref_model`: the reference is the same model with this run's adapter off (a fresh
# adapter), or, continuing from an SFT run, a frozen copy of that run's adapter that TRL adds
# as "ref". No second copy of the base model, with QLoRA too. The rows are TRL's
# conversational preference rows; TRL tokenizes them with the model's chat template.


def pairs_per_batch(batch_size: int) -> int:
    """Pairs per device batch: `batch_size` counts sequences, the unit memory is sized in
    (the preset and the VRAM estimate), and a pair is two (chosen and rejected), so the same
    settings fit the same card for SFT and DPO. At least one pair."""
    return max(1, batch_size // 2)


def preference_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's pairs as TRL's conversational preference rows (the loader's derived
    `messages` dropped)."""
    return [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows]


def build_dpo_args(
    cfg: RunConfig,
    run_dir: Path,
    device: str,
    resume: bool,
    long_context: LongContext | None = None,
):
    """DPOConfig for one run: the arguments every objective shares, plus DPO's own.

    TRL turns gradient checkpointing on by default for DPO; here it follows the run's setting
    like SFT. The Trainer does not evaluate: the held-out pairs are scored once, at the end,
    by `preference_figures`, reference and policy in one pass, which gives the eval loss
    too; at step 0 it is known (the policy is the reference: loss ln 2, rewards 0). On a CPU
    each Trainer eval of 8 pairs cost as much as a training step."""
    from trl import DPOConfig

    common = common_arguments(cfg, run_dir, device, False, resume)
    pairs = pairs_per_batch(cfg.batch_size)
    # Scoring held-out pairs keeps no activations for a backward: twice the pairs fit.
    common.update(per_device_train_batch_size=pairs, per_device_eval_batch_size=2 * pairs)
    args = DPOConfig(
        **common,
        beta=cfg.dpo_beta,
        # DPO's sigmoid loss, plus the SFT loss on the chosen answers when weighted (RPO)
        loss_type=["sigmoid", "sft"] if cfg.dpo_sft_weight > 0 else ["sigmoid"],
        loss_weights=[1.0, cfg.dpo_sft_weight] if cfg.dpo_sft_weight > 0 else None,
        max_length=cfg.max_seq_len,  # prompt + answer; longer pairs are cut at the end
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        precompute_ref_log_probs=False,  # the reference forward runs in each step, no grad
        dataset_num_proc=None,
        **long_context_arguments(long_context),
    )
    if device == "cuda" and not distributed.launched():
        pin_to_one_gpu(args, cfg.gpu_index)
    return args


def dpo_trainer_class():
    """DPOTrainer with the studio's checkpoint kill point; defined lazily (no trl import)."""
    from trl import DPOTrainer

    class StudioDPOTrainer(CheckpointKillPoint, DPOTrainer):
        pass

    return StudioDPOTrainer


def build_dpo_trainer(
    cfg: RunConfig,
    model: Any,
    tok: Any,
    args: Any,
    device: str,
    train_rows: list[dict[str, Any]],
    val_rows: list[dict[str, Any]] | None = None,
    callbacks: Iterable[Any] = (),
):
    """The studio's DPOTrainer on preference rows, LoRA from `cfg` or the SFT run's adapter."""
    from datasets import Dataset

    from studio.train.dpo import install_compact_logps

    model, peft_config = starting_adapter(cfg, model)
    val = preference_rows(val_rows or [])
    trainer = dpo_trainer_class()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(preference_rows(train_rows)),
        eval_dataset=Dataset.from_list(val) if val else None,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=list(callbacks) or None,
    )
    # CPU only: it builds the logits of every answer token at once, fine for a CPU batch,
    # not for a long GPU batch (there TRL's chunked head runs).
    trainer.compact_head = device == "cpu" and compact_head_ok(trainer.model, device)
    if trainer.compact_head:
        install_compact_logps(trainer.model)
    tracking.point_tensorboard_at(trainer, Path(args.output_dir).parent)
    if adapters_need_fp32(cfg, args):
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return trainer


@dataclass
class Built:
    """Everything a run's loop trains with: the trainer (model and args inside), its step
    plan, and how it computes, in words for the metadata."""

    trainer: Any
    plan: dict[str, int]
    summary: dict[str, Any]
    load_s: float  # seconds spent loading the base model
    long_context: LongContext | None = None  # offloading and Liger, with their reasons

    @property
    def model(self) -> Any:
        return self.trainer.model

    @property
    def args(self) -> Any:
        return self.trainer.args


def build(
    cfg: RunConfig,
    model_path: Path,
    tok: Any,
    device: str,
    run_dir: Path,
    train_tok: list[dict[str, list[int]]],
    val_tok: list[dict[str, list[int]]],
    *,
    resume: bool = False,
    callbacks: Iterable[Any] = (),
) -> Built:
    """The run's recipe in one call: the frozen base, the SFTConfig (padding-free only where
    it pays), the trainer with LoRA and the run's callbacks, and the step plan set on it.
    For `objective: dpo`, `train_tok` / `val_tok` are preference rows and the DPO recipe
    builds the arguments and trainer instead."""
    from transformers import PrinterCallback

    card = gpu.card(cfg.gpu_index, device)
    long_context = for_run(cfg, str(model_path), card, distributed.launched())  # before the load
    callbacks = [*callbacks, *long_context_callbacks(long_context)]
    t0 = time.time()
    model = load_base_model(cfg, model_path, device)
    load_s = round(time.time() - t0, 2)
    if cfg.objective == "dpo":
        args = build_dpo_args(cfg, run_dir, device, resume, long_context)
        trainer = build_dpo_trainer(cfg, model, tok, args, device, train_tok, val_tok, callbacks)
    else:
        args = build_training_args(
            cfg, run_dir, device, bool(val_tok), resume, padding_free_ok(model), long_context
        )
        trainer = build_trainer(cfg, model, tok, args, device, train_tok, val_tok, callbacks)
    trainer.remove_callback(PrinterCallback)  # the run's callback logs; no raw dicts on stdout
    plan = apply_step_plan(trainer, cfg)
    summary = recipe_summary(cfg, device, trainer) | long_context.to_dict()
    return Built(trainer, plan, summary, load_s, long_context)


def adapters_need_fp32(cfg: RunConfig, args: Any) -> bool:
    """TRL casts a k-bit model's trainable weights to bf16 (the paper's GPU recipe). Unless
    the run trains in bf16, they must be fp32: fp16's GradScaler cannot unscale bf16
    gradients ("_amp_foreach_non_finite_check_and_unscale_cuda not implemented for
    'BFloat16'" on RTX 20xx/T4 cards), and an fp32 CPU run computes in fp32."""
    return cfg.method == "qlora" and not args.bf16


def plan_steps(cfg: RunConfig, n_batches_per_epoch: int, val_rows: int = 0) -> dict[str, int]:
    """Total optimizer steps and the eval/checkpoint intervals (auto: ~5 evals, ~4 saves)."""
    per_epoch = max(1, math.ceil(n_batches_per_epoch / cfg.grad_accum))
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(per_epoch * cfg.epochs))
    return {
        "total_steps": total,
        "steps_per_epoch": per_epoch,
        "eval_steps": cfg.eval_steps
        or eval_interval(total, cfg.batch_size * cfg.grad_accum, val_rows),
        "save_steps": cfg.save_steps or max(1, total // 4),
    }


def eval_interval(total: int, rows_per_step: int, val_rows: int) -> int:
    """Steps between evals: about 5 per run, fewer when the validation rows are many next to
    the rows the run trains on, so that evals stay near 15% of the run's time or less.

    An eval is a forward pass over every validation row, about a third of what a training row
    costs (forward and backward). Measured (`python -m studio.bench uipath`): 7 evals of 30
    rows in a 21-step run took half its time. The step-0 figure and the last step's eval are
    taken either way, so "eval loss went down" always has its two ends.
    """
    evals = 5
    if val_rows > 0:
        evals = min(5, max(1, int(0.45 * total * rows_per_step / val_rows)))
    return max(1, total // evals)


def apply_step_plan(trainer: Any, cfg: RunConfig) -> dict[str, int]:
    """Set the step plan on a built trainer and return it.

    The plan needs the prepared (maybe packed) data, so it is set after __init__; the
    Trainer reads these when train() starts.
    """
    val_rows = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
    plan = plan_steps(cfg, len(trainer.get_train_dataloader()), val_rows)
    trainer.args.max_steps = plan["total_steps"]
    trainer.args.eval_steps = plan["eval_steps"]
    trainer.args.save_steps = plan["save_steps"]
    return plan


def recipe_summary(cfg: RunConfig, device: str, trainer: Any) -> dict[str, str]:
    """How a built trainer computes, batches and scores, in words for the run's metadata."""
    if cfg.packing:
        batches = "packed"
    elif trainer.args.padding_free:
        batches = "padding-free"
    else:
        batches = "length-grouped, padded per batch"
    return {
        "objective": "DPO (preference pairs)" if cfg.objective == "dpo" else "SFT",
        "precision": precision(device).reason,
        "batches": batches,
        "loss_head": "compact (label positions only)" if trainer.compact_head else "TRL fused",
    }
