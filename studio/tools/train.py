"""`python -m studio.bench train`: the tutorial recipe vs the studio's training path.

(a) the tutorial recipe (pad to max length, loss on every token, plain Trainer with
DataCollatorForLanguageModeling) vs (b) the studio's path, same data/model/steps, each in
its own process, taking turns step by step (a, b, a, b, ...) so that drift on a shared
machine hits both. Then (b) with one of its choices undone, each on its own, to show what
each is worth. On CUDA also MFU and the VRAM estimate next to the measured peak. The
interleaved runner (`run_interleaved`) and the rows (`bench_rows`) serve `uipath` too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from studio.tools.common import (
    PeakRSS,
    load_average,
    load_averages,
    machine,
    release_memory,
    spread,
    write_results,
)

HELP = "tutorial recipe vs the studio's training path"


def bench_rows(n: int, seed: int = 11) -> list[dict[str, Any]]:
    """The bundled sample (90 to ~430 tokens a row), redacted, repeated and shuffled to n rows.

    Redacted because the sample carries planted (fake) PII and the benchmark trains without
    `prepare_run`'s gate: it trains on what a run that passed the gate would see.
    """
    from studio.data.load import SAMPLE_DATASET
    from studio.data.pii import redact_rows

    text = SAMPLE_DATASET.read_text(encoding="utf-8")
    base = [json.loads(line) for line in text.split("\n") if line.strip()]  # JSONL: "\n" only
    base = redact_rows(base)
    rows = [{"messages": [dict(m) for m in base[i % len(base)]["messages"]]} for i in range(n)]
    random.Random(seed).shuffle(rows)
    return rows


class _TokenCounter:
    """Wraps a collator and counts what each batch holds: slots, real tokens, labelled ones."""

    def __init__(self, collate: Callable[[list], dict], pad_id: int | None) -> None:
        self.collate = collate
        self.pad_id = pad_id
        self.batches: list[dict[str, int]] = []

    def __call__(self, features: list) -> dict:
        batch = self.collate(features)
        ids, labels = batch["input_ids"], batch["labels"]
        slots = int(ids.numel())
        # Padding-free batches have no attention mask: every slot is a real token.
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else slots
        self.batches.append({"slots": slots, "real": real, "labelled": int((labels != -100).sum())})
        return batch


def _tutorial_trainer(cfg: Any, model_path: Path, tok: Any, rows: list, device: str, out: Path):
    """(a) The tutorial recipe: pad every row to max length, loss on every token, plain
    Trainer with DataCollatorForLanguageModeling (which also masks every EOS when pad == eos).
    Precision as the tutorials had it: fp32 on CPU (Trainer's default there), the card's
    16-bit type on CUDA."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from studio.data.chat_format import render
    from studio.models.precision import precision
    from studio.train import recipe

    texts = [render(tok, r["messages"]) for r in rows]
    enc = tok(texts, padding="max_length", truncation=True, max_length=cfg.max_seq_len)
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    with mock.patch.dict(os.environ, {"LORA_STUDIO_CPU_FP32": "1"}):  # no effect on CUDA
        dtype = precision(device).torch_dtype
        model = recipe.load_base_model(cfg, model_path, device)
    model = get_peft_model(model, recipe.build_peft_config(cfg, model))
    counter = _TokenCounter(DataCollatorForLanguageModeling(tok, mlm=False), tok.pad_token_id)
    args = TrainingArguments(
        output_dir=str(out / "tutorial"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=device == "cuda" and str(dtype) == "torch.bfloat16",
        fp16=device == "cuda" and str(dtype) == "torch.float16",
        seed=cfg.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=counter)
    return trainer, counter, _precision(dtype, device)


def _precision(dtype: Any, device: str) -> str:
    """How a recipe computes, in words for the printed table."""
    name = str(dtype).replace("torch.", "")
    if name == "float32":
        return "fp32"
    return f"{name} base + autocast" if device == "cpu" else name


def _studio_trainer(
    cfg: Any,
    model_path: Path,
    tok: Any,
    rows: list,
    device: str,
    out: Path,
    *,
    fp32: bool = False,
    padding_free: bool | None = None,
    compact_head: bool = True,
):
    """(b) The studio's own path: the same builders the Train tab uses. `fp32`,
    `padding_free` and `compact_head=False` each undo one of its choices, for the breakdown of
    where the speed comes from."""
    from studio.models.precision import precision
    from studio.train import recipe
    from studio.train.prepare import tokenize_rows

    tokenized, _ = tokenize_rows(tok, rows, cfg)
    with mock.patch.dict(os.environ, {"LORA_STUDIO_CPU_FP32": "1"} if fp32 else {}):
        dtype = precision(device).torch_dtype
        model = recipe.load_base_model(cfg, model_path, device)
        if padding_free is None:
            padding_free = recipe.padding_free_ok(model)
        args = recipe.build_training_args(
            cfg, out / "studio", device, False, False, padding_free=padding_free
        )
    args.save_strategy = "no"
    args.max_steps = cfg.max_steps
    trainer = recipe.build_trainer(cfg, model, tok, args, device, tokenized)
    trainer.compact_head = compact_head and trainer.compact_head
    counter = _TokenCounter(trainer.data_collator, tok.pad_token_id)
    trainer.data_collator = counter
    batches = "padding-free" if padding_free else "length-grouped"
    head = "compact head" if trainer.compact_head else "TRL's fused head"
    return trainer, counter, f"{_precision(dtype, device)}, {batches}, {head}"


# The breakdown: (b) with one of its choices undone, and what that choice is.
_UNDONE = [
    ("studio_padding_free", "(b) padding-free", {"padding_free": True}, "length-grouped batches"),
    ("studio_trl_head", "(b) TRL's head", {"compact_head": False}, "the compact CPU loss head"),
    ("studio_fp32", "(b) in fp32", {"fp32": True}, "bf16 on a CPU with native bf16"),
]


_BUILDERS = {"tutorial": _tutorial_trainer, "studio": _studio_trainer}


def _recipe_worker(job: dict[str, Any], turns: list[Any], out: Any) -> None:
    """One recipe in its own process (own accelerate state, own memory peak): build its
    trainer, then train, taking a turn per optimizer step with the other recipes' processes
    (`turns`: one semaphore each), so that machine drift hits every recipe alike."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from studio import paths
    from studio.config import RunConfig
    from studio.models import loader as models

    paths.set_data_dir(job["data_dir"])
    cfg = RunConfig.from_dict(job["cfg"])
    tok = models.load_tokenizer(job["model_path"])
    rows = bench_rows(job["rows"])
    build = dict(_BUILDERS)[job["builder"]]
    torch.manual_seed(cfg.seed)
    trainer, counter, how = build(
        cfg, Path(job["model_path"]), tok, rows, job["device"], Path(job["tmp"]), **job["undo"]
    )
    me, n = job["index"], len(turns)
    times: list[float] = []

    class Turn(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            turns[me].acquire(timeout=3600)  # a crashed neighbour must not hang this one
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            turns[(me + 1) % n].release()

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Turn())
    release_memory()
    with PeakRSS() as rss:
        result = trainer.train()
    per = max(1, len(counter.batches) // max(1, len(times)))
    steps = [
        {"seconds": t, **{k: sum(b[k] for b in counter.batches[i * per : (i + 1) * per])
                          for k in ("slots", "real", "labelled")}}
        for i, t in enumerate(times)
    ]  # fmt: skip
    figures: dict[str, Any] = {
        "precision": how,
        "final_loss": round(float(result.training_loss), 4),
    }
    if job["device"] == "cuda":
        from studio.train.loop import memory_now

        figures["peak_memory_mb"], figures["memory_kind"] = memory_now("cuda")
        figures.update(_cuda_extras(cfg, Path(job["model_path"]), trainer, _sum_steps(steps[1:])))
    else:
        figures["peak_memory_mb"] = round(rss.peak_bytes / 2**20, 1)
        figures["memory_kind"] = "process RSS peak"
    out.put((job["key"], figures, steps))


def _sum_steps(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput figures over timed steps."""
    secs = sum(s["seconds"] for s in steps) or 1e-9
    real, slots = sum(s["real"] for s in steps), sum(s["slots"] for s in steps)
    return {
        "steps_timed": len(steps),
        "seconds": round(secs, 2),
        "tokens_per_s": round(real / secs, 1),
        "labelled_tokens_per_s": round(sum(s["labelled"] for s in steps) / secs, 1),
        "padding_share": round(1 - real / slots, 3) if slots else 0.0,
    }


def run_interleaved(jobs: list[dict[str, Any]], warm: int) -> dict[str, dict[str, Any]]:
    """Run the jobs' recipes in processes that take turns step by step (a, b, a, b, ...);
    returns key -> figures over the steps after `warm`, plus the per-step list and the load
    average sampled while they ran."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    turns = [ctx.Semaphore(1 if i == 0 else 0) for i in range(len(jobs))]
    out = ctx.Queue()
    # daemon: a benchmark stopped with Ctrl-C takes its recipes' processes with it
    procs = [
        ctx.Process(target=_recipe_worker, args=(job, turns, out), daemon=True) for job in jobs
    ]
    for p in procs:
        p.start()
    found: dict[str, dict[str, Any]] = {}
    loads: list[float] = []
    while len(found) < len(jobs):
        with contextlib.suppress(Exception):
            key, figures, steps = out.get(timeout=5)
            timed = steps[warm:]
            found[key] = {**figures, **_sum_steps(timed), "per_step": timed}
        if (now := load_averages()) is not None:
            loads.append(now[0])
        if len(found) < len(jobs) and any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                p.terminate()
            raise RuntimeError("a benchmark recipe's process failed (its traceback is above)")
    for p in procs:
        p.join()
    for figures in found.values():
        figures["load_average_during"] = spread(loads)
    return found


def run(args: argparse.Namespace) -> int:
    """(a) the tutorial recipe vs (b) the studio path, interleaved step by step in two
    processes; then (b) with one choice undone, each on its own."""
    from studio import paths
    from studio.config import RunConfig
    from studio.models import loader as models
    from studio.train.prepare import resolve_device

    resolved = models.resolve_model(args.model)
    cfg = RunConfig(
        base_model=str(resolved.path),
        method=args.method,
        max_seq_len=args.max_len,
        batch_size=args.batch,
        grad_accum=1,
        max_steps=args.steps + args.warmup,
        learning_rate=2e-4,
        warmup_ratio=0.0,
        target_modules="qv",
        lora_dropout=args.lora_dropout,
        device=args.device,
    ).validate()
    device, why = resolve_device(cfg)
    print(
        f"train benchmark: {resolved.name} ({cfg.method}), {args.rows} rows, max length"
        f" {cfg.max_seq_len}, batch {cfg.batch_size}, {args.warmup} warm-up + {args.steps}"
        f" timed optimizer steps each, (a) and (b) interleaved step by step; lora_dropout"
        f" {cfg.lora_dropout}; device {why}; {os.cpu_count()} cores, load {load_average()}",
        flush=True,
    )
    results: dict[str, Any] = {
        "machine": machine(),
        "model": resolved.name,
        "method": cfg.method,
        "rows": args.rows,
        "max_len": cfg.max_seq_len,
        "batch": cfg.batch_size,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "lora_dropout": cfg.lora_dropout,
        "load_average_at_start": load_average(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="lora-studio-bench-train-"))
    base = {"cfg": cfg.to_dict(), "model_path": str(resolved.path), "rows": args.rows}
    base |= {"device": device, "tmp": str(tmp), "data_dir": str(paths.data_dir())}
    try:
        pair = [
            {**base, "key": key, "builder": key, "undo": {}, "index": i}
            for i, key in enumerate(("tutorial", "studio"))
        ]
        results.update(run_interleaved(pair, args.warmup))
        for key, label in (("tutorial", "(a) tutorial"), ("studio", "(b) studio")):
            _print_recipe(label, results[key])
        _compare_recipes(results)
        breakdown = cfg.replace(max_steps=args.breakdown_steps + args.warmup).to_dict()
        for key, label, undo, _ in _UNDONE if args.breakdown else []:
            if device == "cpu" or key == "studio_padding_free":
                job = {**base, "cfg": breakdown, "key": key, "builder": "studio"}
                results.update(run_interleaved([{**job, "undo": undo, "index": 0}], args.warmup))
                _print_recipe(label, results[key])
        _compare_breakdown(results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_results(args, "train", results)
    return 0


def _print_recipe(label: str, r: dict[str, Any]) -> None:
    print(
        f"{label:17s}: {r['tokens_per_s']:7.1f} real tokens/s,"
        f" {r['labelled_tokens_per_s']:7.1f} label-bearing tokens/s"
        f" ({r['steps_timed']} steps, {r['seconds']:.1f} s),"
        f" padding {r['padding_share']:.0%}, peak"
        f" {r['peak_memory_mb']:,.0f} MB ({r['memory_kind']}), final loss"
        f" {r['final_loss']}; {r['precision']}",
        flush=True,
    )


def _compare_recipes(results: dict[str, Any]) -> None:
    """(b) against (a): the ratio of the totals, and the median and spread of the per-step
    ratios (step i of (b) against step i of (a), run back to back)."""
    a, b = results["tutorial"], results["studio"]
    results["ratio_tokens_per_s"] = round(b["tokens_per_s"] / a["tokens_per_s"], 2)
    results["ratio_labelled_tokens_per_s"] = round(
        b["labelled_tokens_per_s"] / a["labelled_tokens_per_s"], 2
    )
    results["ratio_step_time"] = round(a["seconds"] / b["seconds"], 2)

    def rate(s: dict[str, Any], k: str) -> float:
        return s[k] / max(s["seconds"], 1e-9)

    pairs = list(zip(a["per_step"], b["per_step"], strict=False))
    per_step = {
        k: spread([rate(sb, k) / max(rate(sa, k), 1e-9) for sa, sb in pairs])
        for k in ("labelled", "real")
    }
    results["ratio_per_step_labelled"], results["ratio_per_step_real"] = per_step.values()
    lab, load = per_step["labelled"], a.get("load_average_during") or {}
    print(
        f"ratio (b)/(a): {results['ratio_labelled_tokens_per_s']}x label-bearing tokens/s"
        f" (goal >= 3x), {results['ratio_tokens_per_s']}x real tokens/s,"
        f" {results['ratio_step_time']}x faster per optimizer step"
    )
    if lab:
        print(
            f"per-step ratio, label-bearing ({lab['n']} interleaved pairs): median"
            f" {lab['median']}x, IQR {lab['q1']}-{lab['q3']}x, range {lab['min']}-{lab['max']}x;"
            f" real tokens median {per_step['real']['median']}x; load average during the run"
            f" {load.get('median', 'n/a')} (range {load.get('min', '?')}-{load.get('max', '?')})"
        )


def _compare_breakdown(results: dict[str, Any]) -> None:
    """(b) against each run with one of its choices undone (run after the pair, on its own)."""
    b = results["studio"]
    for key, label, _, choice in _UNDONE:
        if key in results:
            ratio = round(b["tokens_per_s"] / results[key]["tokens_per_s"], 2)
            results[f"gain_over_{key}"] = ratio
            print(f"breakdown: {choice}: (b) runs {ratio}x the real tokens/s of {label}")


def _cuda_extras(cfg: Any, model_path: Path, trainer: Any, r: dict[str, Any]) -> dict[str, Any]:
    """MFU and the VRAM estimate next to the measured peak (CUDA only)."""
    import torch

    from studio.models.loader import logical_params

    n_params = logical_params(trainer.model)
    name = torch.cuda.get_device_name(0)
    peak_tflops = _PEAK_BF16_TFLOPS.get(next((k for k in _PEAK_BF16_TFLOPS if k in name), ""), 0)
    extras: dict[str, Any] = {"gpu": name, "params": n_params}
    if peak_tflops:
        extras["mfu"] = round(4 * n_params * r["tokens_per_s"] / (peak_tflops * 1e12), 4)
    from studio.hardware import vram

    extras["vram_measured_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    try:
        est = vram.estimate(vram.model_shape(str(model_path)), vram.run_settings(cfg))
        # allocated: what max_memory_allocated counts (no CUDA context or allocator slack)
        extras["vram_estimate_mb"] = round(est.allocated_bytes / 2**20)
        extras["vram_estimate_error_share"] = round(
            est.allocated_bytes / torch.cuda.max_memory_allocated() - 1, 3
        )
    except (vram.ModelShapeError, ValueError) as exc:  # a bonus here; say why it is missing
        extras["vram_estimate_error"] = str(exc)
    return extras


# Dense bf16 peak of common cards (TFLOP/s), for MFU.
_PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "4090": 165.2,
    "4080": 97.5,
    "4070": 58.3,
    "4060": 30.2,
    "3090": 71.0,
    "3060": 25.4,
}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=300, help="rows of varied length (300)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per recipe (20)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per recipe (1)")
    p.add_argument(
        "--breakdown-steps", type=int, default=8, help="timed steps per breakdown run (8)"
    )
    p.add_argument(
        "--lora-dropout", type=float, default=0.05, help="LoRA dropout of every recipe (0.05)"
    )
    p.add_argument("--max-len", type=int, default=512, help="max sequence length (512)")
    p.add_argument("--batch", type=int, default=4, help="rows per step (4)")
    p.add_argument("--method", choices=("lora", "qlora"), default="lora")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the runs of (b) with one choice undone (padding-free batches, fp32 on CPU)",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
