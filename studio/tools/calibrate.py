"""Calibrate the VRAM estimate (studio/hardware/vram.py) against real training steps.

Run on a machine with an NVIDIA GPU:

    python -m studio.hardware.calibrate                       # all cases (0.5B, 1.5B, 7B, 8B)
    python -m studio.hardware.calibrate --models Qwen/Qwen2.5-0.5B-Instruct --methods qlora

Each case builds the model from its reference config with random weights (memory does not
depend on the values, so nothing is downloaded), saves it once to a temporary folder, and
trains a few real steps through the studio's own recipe (`studio.train.recipe`: the same
`load_base_model`, training args, LoRA config and `build_trainer` a user's run goes through)
on synthetic rows of max_seq_len tokens, one row of each batch a token shorter, so the batch
carries the padding mask of the worst case. Only two things differ from a user's run, and
neither changes a step's memory: no checkpoints are written, and batches keep their order.
It prints the estimate against what torch measured, per part and in total:

- base weights: `torch.cuda.memory_allocated()` after loading;
- LoRA: bytes of the adapter weights, their gradients and the optimizer states;
- saved activations: bytes autograd keeps for backward (a saved-tensors hook);
- step peak: `max_memory_allocated()` during a step minus what was resident before it;
- total: `max_memory_allocated()` over the run against the estimate's allocated bytes
  (paged optimizer states live in unified memory, which torch's counters do not see).

The accuracy goal is 15% (or 0.5 GiB, whichever is larger) on the total.

Without a GPU it says so and exits 0. `--cpu-proxy` runs small cases on CPU instead, with
bf16 autocast, TRL's loss head as on CUDA, and a tensor-level peak counter: it checks the
formulas' structure (what autograd keeps, in which dtype), not CUDA's kernels, allocator or
context. `--cpu-proxy --cpu-fp32` measures the studio's CPU recipe itself (fp32, compact head).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from studio import gpu
from studio.config import RunConfig
from studio.hardware import vram

GOAL_SHARE = 0.15
GOAL_FLOOR = 0.5 * vram.GIB

# (model, method, batch, seq, gradient checkpointing): sized to fit a 24 GB card, so any
# calibration GPU can run them.
CUDA_CASES: list[tuple[str, str, int, int, bool]] = [
    ("Qwen/Qwen2.5-0.5B-Instruct", "lora", 4, 1024, False),
    ("Qwen/Qwen2.5-0.5B-Instruct", "qlora", 4, 1024, False),
    ("Qwen/Qwen2.5-0.5B-Instruct", "lora", 8, 1024, True),
    ("Qwen/Qwen2.5-1.5B-Instruct", "lora", 2, 1024, False),
    ("Qwen/Qwen2.5-1.5B-Instruct", "qlora", 4, 1024, True),
    ("Qwen/Qwen2.5-7B-Instruct", "qlora", 1, 1024, False),
    ("Qwen/Qwen2.5-7B-Instruct", "qlora", 2, 1024, True),
    ("Qwen/Qwen2.5-7B-Instruct", "lora", 1, 1024, True),
    ("meta-llama/Llama-3.1-8B-Instruct", "qlora", 2, 1024, True),
    ("meta-llama/Llama-3.1-8B-Instruct", "lora", 1, 512, True),
]
# Small enough for 2 CPU cores; a layer count cut keeps a 0.5B-wide model quick.
CPU_CASES: list[tuple[str, str, int, int, bool]] = [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "lora", 2, 256, False),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "lora", 2, 256, True),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "qlora", 2, 256, False),
    ("Qwen/Qwen2.5-0.5B-Instruct", "lora", 2, 256, False),
    ("Qwen/Qwen2.5-0.5B-Instruct", "qlora", 1, 256, True),
]


@dataclass
class Measured:
    """What one case measured (bytes), next to its estimate."""

    name: str
    estimate: vram.VramEstimate
    base: int = 0
    lora: int = 0
    saved: int = 0
    step_peak: int = 0
    total: int = 0
    reserved: int = 0
    context: int = 0
    seconds: float = 0.0
    error: str = ""
    steps: list[dict[str, int]] = field(default_factory=list)
    saved_per_step: list[int] = field(default_factory=list)


class LivePeak:
    """Peak of live tensor bytes on CPU, counted per storage (torch has no CPU allocator stats).

    A TorchDispatchMode sees every op's outputs; storages are followed with weak references, so
    freed tensors leave the count. Only tensors created while it is active are counted, and
    views of `existing` storages (weights, optimizer states: given by data pointer) are not.
    """

    def __init__(self, existing: set[int] | None = None) -> None:
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._update(out, torch, StorageWeakRef, tree_leaves)
                return out

        self.existing = existing or set()
        self.live: dict[int, tuple[Any, int]] = {}
        self.current = 0
        self.peak = 0
        self._mode = _Mode()

    def _update(self, out: Any, torch: Any, weak_ref: Any, leaves: Any) -> None:
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                if storage.data_ptr() in self.existing:
                    continue
                ref = weak_ref(storage)
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)

    def __enter__(self) -> LivePeak:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def _state_tensors(optimizer: Any) -> list[Any]:
    """The optimizer's state tensors (AdamW moments, 8-bit quantization stats)."""
    import torch

    if optimizer is None:
        return []
    return [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]


def _word_tokenizer(vocab_size: int):
    """A tokenizer with one word per id: enough for SFTTrainer on pre-tokenized rows."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1"
    )


def _rows(vocab: int, seq: int, n: int, batch: int = 1) -> list[list[int]]:
    """Rows of `seq` tokens, the last of each batch one shorter: the worst case the estimate
    describes (every token of the batch real, and a padding mask)."""
    import random

    rng = random.Random(0)
    lengths = [seq - 1 if batch > 1 and i % batch == batch - 1 else seq for i in range(n)]
    return [[rng.randrange(2, vocab) for _ in range(length)] for length in lengths]


def case_config(
    model_dir: Path,
    method: str,
    batch: int,
    seq: int,
    checkpointing: bool,
    *,
    device: str,
    steps: int,
    lora_r: int,
    target_modules: str,
    optimizer: str,
) -> RunConfig:
    """The run config of one case: what a user would set to train this shape."""
    return RunConfig(
        run_name="calibrate",
        base_model=str(model_dir),
        method=method,
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
        lora_dropout=0.05,
        target_modules=target_modules,
        max_seq_len=seq,
        batch_size=batch,
        grad_accum=1,
        max_steps=steps,
        learning_rate=1e-4,
        gradient_checkpointing=checkpointing,
        optimizer=optimizer,
        assistant_only_loss=False,  # synthetic rows: every token carries the loss
        val_fraction=0.0,
        seed=0,
        device=device,
    ).validate()


def run_case(
    model: str,
    method: str,
    batch: int,
    seq: int,
    checkpointing: bool,
    *,
    device: str,
    root: Path,
    steps: int = 3,
    lora_r: int = 16,
    target_modules: str = "all_linear",
    optimizer: str | None = None,
    num_layers: int | None = None,
    fp32: bool = False,
) -> Measured:
    """Train `steps` real steps of the studio's recipe and measure memory; see the module
    docstring for the parts.

    `fp32` (CPU only) runs the studio's CPU recipe: fp32 weights and compute, no autocast.
    """
    import dataclasses

    cuda = device == "cuda"
    optimizer = optimizer or ("paged_adamw_8bit" if cuda else "adamw_torch")
    folder = _random_weights_model(root, model, num_layers, device)
    cfg = case_config(
        folder, method, batch, seq, checkpointing, device=device, steps=steps, lora_r=lora_r,
        target_modules=target_modules, optimizer=optimizer,
    )  # fmt: skip
    shape = vram.model_shape(model)
    if num_layers:
        shape = dataclasses.replace(shape, num_layers=num_layers)
    profile = "cuda" if cuda else ("cpu" if fp32 else "cpu-bf16")
    name = (
        f"{model.split('/')[-1]}{f' ({num_layers} layers)' if num_layers else ''} {method}"
        f" r{lora_r} {target_modules} batch {batch} x {seq}"
        f" gc={'on' if checkpointing else 'off'} {optimizer}{' fp32' if fp32 else ''}"
    )
    result = Measured(name, vram.estimate(shape, cfg, device=profile))
    started = time.time()
    with _cpu_compute(fp32) if not cuda else contextlib.nullcontext():
        trainer, before = _load_and_build(cfg, folder, root, shape, device, result)
    _train_and_measure(trainer, result, device, before, steps)
    result.seconds = time.time() - started
    del trainer
    gpu.free_memory()
    return result


def _random_weights_model(root: Path, model: str, num_layers: int | None, device: str) -> Path:
    """A folder with the reference config and random weights (memory does not depend on the
    values, so nothing is downloaded), saved once and reused by later cases."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = root / f"{model.replace('/', '--')}-{num_layers or 'all'}"
    if not (folder / "config.json").is_file():
        cfg = dict(vram.REFERENCE_CONFIGS[model])
        if num_layers:
            cfg["num_hidden_layers"] = num_layers
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device(device):
            net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        net.save_pretrained(str(folder))
        del net
        gpu.free_memory()
    return folder


@contextlib.contextmanager
def _cpu_compute(fp32: bool) -> Iterator[None]:
    """The CPU proxy computes as a bf16 GPU does (bf16 base, bf16 autocast) whether or not this
    CPU has native bf16, or in fp32 as the studio's CPU recipe does on CPUs without it. Both
    are asked of the one precision rule, so the recipe's own builders follow."""
    from studio.models import precision

    if fp32:
        with mock.patch.dict(os.environ, {precision.CPU_FP32_ENV: "1"}):
            yield
        return
    with (
        mock.patch.dict(os.environ, {}),
        mock.patch.object(precision, "cpu_flags", lambda: frozenset({"amx_bf16"})),
    ):
        os.environ.pop(precision.CPU_FP32_ENV, None)
        yield


def _load_and_build(
    cfg: RunConfig, folder: Path, root: Path, shape: vram.ModelShape, device: str, result: Measured
) -> tuple[Any, int]:
    """Load the base as users train it and build the studio's trainer on synthetic rows.

    Returns the trainer and the bytes allocated before the base was loaded (CUDA)."""
    import torch
    from transformers import PrinterCallback

    from studio.train import recipe

    cuda = device == "cuda"
    gpu.free_memory()
    before = 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    net = recipe.load_base_model(cfg, folder, device)
    if cuda:
        result.base = torch.cuda.memory_allocated() - before
    else:  # tied embeddings share one storage: count each storage once
        storages = {t.untyped_storage().data_ptr(): t for t in net.state_dict().values()}
        result.base = sum(t.untyped_storage().nbytes() for t in storages.values())

    args = recipe.build_training_args(
        cfg, root / "trainer-out", device, False, False, padding_free=recipe.padding_free_ok(net)
    )
    # Two deliberate differences from a user's run, neither of which changes a step's memory:
    # no checkpoints are written, and batches keep their order, so each keeps its shorter row.
    args.save_strategy = "no"
    args.train_sampling_strategy = "sequential"
    rows = _rows(
        shape.vocab_size, cfg.max_seq_len, cfg.batch_size * (cfg.max_steps + 1), cfg.batch_size
    )
    tokenized = [{"input_ids": row, "labels": list(row)} for row in rows]
    tok = _word_tokenizer(shape.vocab_size)
    probe = _probe(result, cuda)
    trainer = recipe.build_trainer(cfg, net, tok, args, device, tokenized, callbacks=[probe])
    trainer.remove_callback(PrinterCallback)
    if not cuda and args.bf16:
        # The bf16 CPU proxy stands in for the CUDA recipe, which scores with TRL's head; the
        # fp32 proxy keeps the compact head of the studio's CPU recipe.
        trainer.compact_head = False
    _count_saved_tensors(trainer, result)
    return trainer, before


def _count_saved_tensors(trainer: Any, result: Measured) -> None:
    """Wrap the trainer's own compute_loss to count the bytes autograd keeps for backward
    (weights left out), into `result.saved_per_step`."""
    import torch

    inner = trainer.compute_loss

    def compute_loss(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        seen: dict[int, int] = {}
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t: Any) -> Any:
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = inner(model, inputs, *args, **kwargs)
        result.saved_per_step.append(sum(seen.values()))
        return loss

    trainer.compute_loss = compute_loss


def _probe(result: Measured, cuda: bool) -> Any:
    """A TrainerCallback that measures each step's peak, gradients, optimizer states and
    adapter weights into `result.steps`."""
    from transformers import TrainerCallback

    return type("Probe", (_Probe, TrainerCallback), {})(result, cuda)


class _Probe:
    """The per-step measurements of `_probe` (made a TrainerCallback there, lazily)."""

    def __init__(self, result: Measured, cuda: bool) -> None:
        self.result, self.cuda = result, cuda
        self.resident, self.grads, self.live = 0, 0, None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            tensors = [*model.parameters(), *model.buffers(), *_state_tensors(optimizer)]
            existing = {t.untyped_storage().data_ptr() for t in tensors}
            self.live = LivePeak(existing).__enter__()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads = sum(
            p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None
        )

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - self.resident
        else:
            self.live.__exit__(None, None, None)
            peak, self.live = self.live.peak, None
        states = sum(t.untyped_storage().nbytes() for t in _state_tensors(optimizer))
        weights = sum(p.untyped_storage().nbytes() for p in model.parameters() if p.requires_grad)
        self.result.steps.append(
            {"peak": peak, "grads": self.grads, "states": states, "weights": weights}
        )


def _train_and_measure(
    trainer: Any, result: Measured, device: str, before: int, steps: int
) -> None:
    """Train, then read the totals: CUDA's counters, or the parts added up on CPU."""
    import torch

    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
        result.total = torch.cuda.max_memory_allocated() - before
        result.reserved = torch.cuda.max_memory_reserved()
        free, total = torch.cuda.mem_get_info()
        result.context = max(0, total - free - torch.cuda.memory_reserved())
    last = result.steps[-1]
    result.lora = last["weights"] + last["grads"] + last["states"]
    result.saved = result.saved_per_step[-1] if result.saved_per_step else 0
    # A later step, once the optimizer states exist: the steady state the estimate describes.
    result.step_peak = max(s["peak"] for s in result.steps[1:]) if steps > 1 else last["peak"]
    if not cuda:
        result.total = result.base + last["weights"] + last["states"] + result.step_peak


def _estimated_saved(est: vram.VramEstimate, shape: vram.ModelShape) -> int:
    """The part of the activations estimate that autograd keeps (no backward buffers)."""
    k = vram.KERNELS[est.device]
    s = est.settings
    adapter = k.adapter_qlora if s["method"] == "qlora" else k.adapter_lora
    layer = vram.layer_saved_per_token(shape, s, k, adapter)
    T = est.tokens_per_step
    per_layer = k.compute * shape.hidden_size if s["gradient_checkpointing"] else layer
    once = 4 * shape.hidden_size + 2 * shape.head_dim * k.compute
    # SDPA's additive copy of the padding mask, kept per layer (the boolean original is not
    # saved for backward, so it is not counted here)
    S = s["max_seq_len"]
    layer_mask = s["batch_size"] * S * S * k.compute if s["batch_size"] > 1 else 0
    layers_kept = 0 if s["gradient_checkpointing"] else shape.num_layers
    head = T * shape.hidden_size * k.compute  # the chunked head keeps its hidden states
    return int(T * (shape.num_layers * per_layer + once) + head + layers_kept * layer_mask)


def report(result: Measured, shape: vram.ModelShape) -> tuple[float, bool]:
    """Print one case; return the total's relative error and whether it meets the goal."""
    est = result.estimate
    gib = vram.GIB
    paged = est.settings["optimizer"].startswith("paged") and est.device == "cuda"
    k = vram.KERNELS[est.device]
    adapter = k.adapter_qlora if est.settings["method"] == "qlora" else k.adapter_lora
    states = vram.optimizer_bytes(shape, est.settings, adapter)
    estimated_step = est.allocated_bytes - est.part("base") - est.part("lora")
    estimated_step += est.trainable_params * adapter  # gradients appear during the step
    est_total = est.allocated_bytes - (states if paged else 0)
    measured_lora = result.lora
    print(f"\n== {result.name}  ({result.seconds:.0f} s)")
    rows = [
        ("base weights", est.part("base"), result.base),
        ("LoRA weights+grads+optimizer", est.part("lora"), measured_lora),
        ("saved activations (in step)", _estimated_saved(est, shape), result.saved),
        ("step peak above resident", estimated_step, result.step_peak),
        ("total allocated", est_total, result.total),
    ]
    print(f"  {'part':<30} {'estimate':>9} {'measured':>9} {'error':>7}")
    for label, e, m in rows:
        err = (e - m) / m if m else float("nan")
        print(f"  {label:<30} {e / gib:8.2f}G {m / gib:8.2f}G {err:+7.1%}")
    if est.device == "cuda":
        print(
            f"  reserved {result.reserved / gib:.2f}G + context {result.context / gib:.2f}G"
            f" = {(result.reserved + result.context) / gib:.2f}G vs estimate total"
            f" {est.total_bytes / gib:.2f}G"
        )
        if paged:
            print(f"  (paged optimizer states, {states / gib:.3f}G, are outside torch's counters)")
    err = (est_total - result.total) / result.total if result.total else float("nan")
    ok = abs(est_total - result.total) <= max(GOAL_SHARE * result.total, GOAL_FLOOR)
    print(f"  total: {err:+.1%} -> {'within' if ok else 'OUTSIDE'} the goal (15% or 0.5 GiB)")
    return err, ok


@contextlib.contextmanager
def _workdir(keep: str | None) -> Iterator[Path]:
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="vram-measure-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m studio.hardware.calibrate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--models", nargs="*", help="reference model ids (default: all cases)")
    parser.add_argument("--methods", nargs="*", choices=("lora", "qlora"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", help="keep the random-weight model folders here")
    parser.add_argument(
        "--cpu-proxy",
        action="store_true",
        help="no GPU: run small cases on CPU with bf16 autocast and a tensor-level counter",
    )
    parser.add_argument(
        "--cpu-fp32",
        action="store_true",
        help="with --cpu-proxy: the studio's CPU recipe (fp32, no autocast) instead of bf16",
    )
    parser.add_argument("--layers", type=int, help="cut each model to this many layers")
    return parser


def _select_cases(
    cases: list[tuple[str, str, int, int, bool]], args: argparse.Namespace
) -> list[tuple[str, str, int, int, bool]]:
    """The cases asked for; a model without cases gets one LoRA and one QLoRA case."""
    if args.models:
        cases = [c for c in cases if c[0] in args.models] or [
            (m, meth, 1, 512, True) for m in args.models for meth in ("lora", "qlora")
        ]
    if args.methods:
        cases = [c for c in cases if c[1] in args.methods]
    return cases


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    if args.cpu_proxy:
        device, cases = "cpu", CPU_CASES
    elif torch.cuda.is_available():
        device, cases = "cuda", CUDA_CASES
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    else:
        print(
            "A CUDA GPU is needed to calibrate the estimate against torch.cuda's counters;"
            " none is available here (torch"
            f" {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})."
            " Run it on a GPU machine, or pass --cpu-proxy for a CPU check of the formulas."
        )
        return 0
    errors: list[float] = []
    misses = 0
    with _workdir(args.workdir) as root:
        for model, method, batch, seq, ckpt in _select_cases(cases, args):
            shape = vram.model_shape(model)
            if args.layers:
                import dataclasses

                shape = dataclasses.replace(shape, num_layers=args.layers)
            try:
                result = run_case(
                    model, method, batch, seq, ckpt, device=device, root=root, steps=args.steps,
                    num_layers=args.layers, fp32=args.cpu_proxy and args.cpu_fp32,
                )  # fmt: skip
            except Exception as exc:  # one failing case must not hide the others' figures
                print(
                    f"\n== {model} {method} batch {batch} x {seq}: FAILED {type(exc).__name__}:"
                    f" {exc}"
                )
                misses += 1
                gpu.free_memory()
                continue
            err, ok = report(result, shape)
            errors.append(abs(err))
            misses += 0 if ok else 1
    if errors:
        mean = sum(errors) / len(errors)
        print(
            f"\n{len(errors)} cases measured on {device}: mean |error| {mean:.1%},"
            f" worst {max(errors):.1%}, {misses} outside the goal or failed"
        )
    return 0 if misses == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
