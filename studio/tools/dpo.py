"""`python -m studio.bench dpo`: steps/s and peak memory of DPO against SFT on the same rows.

The same preference pairs train twice through the studio's own recipe (`recipe.build_trainer`
and `recipe.build_dpo_trainer`, as the Train tab builds them), each in its own process so
neither's memory counts in the other's peak: SFT on prompt + chosen, DPO on prompt + chosen +
rejected with its no-grad reference forward. Both take the same number of optimizer steps of
the same batch settings; the first step of each is a warm-up and is not timed. It prints the
machine it ran on and the load average, so the plan and the VRAM estimate can say what a DPO
step costs next to an SFT step here.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

from studio.tools.common import PeakRSS, load_average, machine, mb, write_results
from studio.train.plan import DPO_PAIR_COST

HELP = "DPO vs SFT on the same preference rows: steps/s and peak memory"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="", help="preference file (default: the bundled sample)")
    p.add_argument("--rows", type=int, default=16, help="pairs to train on")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (1 more as warm-up)")
    p.add_argument("--batch", type=int, default=2, help="batch_size (DPO: half as many pairs)")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", default="", help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    from studio.data.load import SAMPLE_PREFERENCES

    data = args.data or str(SAMPLE_PREFERENCES)
    print(f"dpo benchmark on {machine()}")
    print(f"data: {data}, {args.rows} pairs, {args.steps} timed steps, batch {args.batch}")
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, Any] = {"machine": machine(), "data": data}
    for objective in ("sft", "dpo"):
        job = {**vars(args), "data": data, "objective": objective}
        with ctx.Pool(1) as pool:
            results[objective] = pool.apply(measure, (job,))
        _print(objective, results[objective])
    sft, dpo = results["sft"], results["dpo"]
    ratio = dpo["s_per_step"] / sft["s_per_step"]
    per_pair = ratio * sft["pairs_per_step"] / dpo["pairs_per_step"]
    results["dpo_step_vs_sft"] = round(ratio, 2)
    results["dpo_pair_vs_sft_row"] = round(per_pair, 2)
    print(
        f"a DPO step takes {ratio:.2f}x an SFT step of the same settings"
        f" ({dpo['sequences_per_step']} vs {sft['sequences_per_step']} sequences a step);"
        f" a pair costs {per_pair:.2f}x an SFT row of it (the plan assumes"
        f" {DPO_PAIR_COST}); load average {load_average()}"
    )
    write_results(args, "dpo", results)
    return 0


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One objective's timed steps and peak memory, in this (fresh) process."""
    import torch

    from studio.config import RunConfig
    from studio.data.load import load_dataset_file, training_row
    from studio.models.loader import load_tokenizer, resolve_model
    from studio.train import recipe
    from studio.train.prepare import resolve_device, tokenize_rows

    base = resolve_model(RunConfig().base_model)
    tok = load_tokenizer(base.path)
    rows = [training_row(r) for r in load_dataset_file(job["data"]).rows][: job["rows"]]
    cfg = RunConfig(
        objective=job["objective"],
        batch_size=job["batch"],
        max_seq_len=job["max_len"],
        max_steps=job["steps"] + 1,
        device=job["device"],
        warmup_ratio=0.0,
    )
    device, _ = resolve_device(cfg)
    out = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    timer = _step_timer()
    with PeakRSS() as rss:
        model = recipe.load_base_model(cfg, base.path, device)
        if cfg.objective == "dpo":
            args = recipe.build_dpo_args(cfg, out, device, False)
            trainer = recipe.build_dpo_trainer(cfg, model, tok, args, device, rows, None, [timer])
            pairs = recipe.pairs_per_batch(cfg.batch_size)
        else:
            args = recipe.build_training_args(cfg, out, device, False, False)
            tokenized, _ = tokenize_rows(tok, rows, cfg)
            trainer = recipe.build_trainer(cfg, model, tok, args, device, tokenized, None, [timer])
            pairs = cfg.batch_size  # each row is one pair's prompt + chosen
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the figures below, not raw log dicts
        trainer.args.save_strategy = "no"
        trainer.args.max_steps = cfg.max_steps
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    timed = timer.times[1:]  # the first step warms up (allocations, kernels)
    s_per_step = sum(timed) / max(1, len(timed))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss.peak_bytes
    return {
        "device": device,
        "steps": len(timed),
        "s_per_step": round(s_per_step, 3),
        "steps_per_s": round(1 / s_per_step, 4) if s_per_step else None,
        "pairs_per_step": pairs * cfg.grad_accum,
        "sequences_per_step": (2 if cfg.objective == "dpo" else 1) * pairs * cfg.grad_accum,
        "peak_memory_bytes": int(peak),
        "memory_kind": "GPU peak allocated" if device == "cuda" else "process peak RSS",
    }


def _step_timer() -> Any:
    """A TrainerCallback that keeps the wall time of each optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def _print(objective: str, r: dict[str, Any]) -> None:
    print(
        f"{objective.upper():>4} on {r['device']}: {r['steps_per_s']} steps/s"
        f" ({r['s_per_step']} s a step: {r['pairs_per_step']} pairs,"
        f" {r['sequences_per_step']} sequences),"
        f" peak memory {mb(r['peak_memory_bytes'])} ({r['memory_kind']})"
    )
