"""Chat benchmark: memory of both sides vs the base alone, time to first token, tokens/s,
and what batching both sides in one pass is worth.

Run by `python -m studio.bench chat` (`bench_chat` returns the figures, prints nothing). Each
memory figure is taken in a fresh child process (`_in_child` -> `_measure_load`), so memory
freed by an earlier load cannot blur the comparison. The batching figures (`batching_ratios`)
time the engine's own paths, batched and one by one, interleaved (a, b, b, a, ...) so that
drift on a shared machine hits both, and report the median and spread of the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from studio import paths
from studio.chat import evaluate
from studio.chat.engine import (
    PRECISION_AUTO,
    SIDE_BASE,
    SIDE_LABELS,
    SIDES,
    ChatEngine,
    ChatError,
    GenerationSettings,
    load_base,
    model_bytes,
    resolve_adapter,
    resolve_base,
    wants_four_bit,
)
from studio.data import chat_format
from studio.models import loader as models
from studio.models.batching import batch_cost_problem
from studio.tools.common import load_averages, machine, write_results


def _base_alone(adapter: str, base: str | None, precision: str, prompt: str) -> tuple[Any, int]:
    """The base loaded as the engine would, after one generation (so buffers count), and its
    weight bytes. The caller holds the model while it reads the process memory."""
    import torch

    source = resolve_adapter(adapter)
    resolved = resolve_base(base or source.base_model or "", source)
    model = load_base(resolved.path, wants_four_bit(source.method, precision))
    tok = models.load_tokenizer(resolved.path)
    text = chat_format.render(tok, [{"role": "user", "content": prompt}], True)
    enc = tok(text, add_special_tokens=False, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=8, do_sample=False)
    return model, model_bytes(model)


def _engine(adapter: str, base: str | None, precision: str, prompt: str) -> tuple[Any, int]:
    """The chat engine loaded, after one generation per side, and the weight bytes it holds."""
    engine = ChatEngine()
    engine.load(adapter, base, precision)
    for side in SIDES:
        engine.generate(
            side, [{"role": "user", "content": prompt}], GenerationSettings(max_new_tokens=8)
        )
    return engine, engine.tensor_bytes()


def _measure_load(kind: str, adapter: str, base: str | None, precision: str, prompt: str) -> None:
    """Child process: load the base alone, or the chat engine, and print its memory as JSON."""
    import psutil
    import torch
    import transformers  # noqa: F401  (libraries count in neither figure)
    from peft import PeftModel  # noqa: F401

    proc = psutil.Process()
    cuda = torch.cuda.is_available()
    gc.collect()
    rss0 = proc.memory_info().rss
    out: dict[str, Any] = {}
    load = _base_alone if kind == "base" else _engine
    try:
        held, out["tensor_bytes"] = load(adapter, base, precision, prompt)  # held while measured
        gc.collect()
        out["rss_delta"] = proc.memory_info().rss - rss0
        out["cuda_allocated"] = torch.cuda.memory_allocated() if cuda else None
        del held
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print("BENCH_RESULT " + json.dumps(out), flush=True)


def _in_child(kind: str, adapter: str, base: str | None, precision: str, prompt: str):
    """Each memory figure in a fresh process, so freed memory cannot blur the comparison."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env[paths.ENV_VAR] = str(paths.data_dir())
    code = (
        "import sys, json; from studio.tools.chat import _measure_load;"
        " _measure_load(*json.loads(sys.argv[1]))"
    )
    args = json.dumps([kind, adapter, base, precision, prompt])
    done = subprocess.run(
        [sys.executable, "-c", code, args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env={**env, "PYTHONIOENCODING": "utf-8"},
        timeout=1800,
        check=False,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ChatError(f"benchmark ({kind}) child failed: {' | '.join(tail)}")
    result = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    if "error" in result:
        raise ChatError(f"benchmark ({kind}): {result['error']}")
    return result


# Eight prompts of different lengths for the batch-compare figure (each answered on both sides).
BATCH_PROMPTS = [
    "My parcel has not arrived after two weeks. What should I do?",
    "Tôi bị trừ tiền hai lần cho cùng một đơn hàng, làm sao để được hoàn tiền?",
    "How do I reset my password if the email never arrives?",
    "Can I change the delivery address after the order has shipped?",
    "สินค้าที่ได้รับชำรุด ต้องการเปลี่ยนสินค้าใหม่ ต้องทำอย่างไร",
    "The app crashes every time I open my order history on Android. Any fix?",
    "Do you ship to Da Nang, and how long does it take?",
    "I want to cancel my subscription but the button is greyed out. Please help.",
]


def bench_chat(
    model: str | None,
    run_dir: str | Path,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    precision: str = PRECISION_AUTO,
    ab_tokens: int = 128,
    batch_prompts: list[str] | None = None,
    batch_tokens: int = 32,
    reps: int = 3,
    memory: bool = True,
) -> dict[str, Any]:
    """Measure chat memory and speed; returns figures, prints nothing.

    Memory: the base alone vs the chat engine with both sides ready (each loaded in its own
    fresh process, after one generation so working buffers count): process RSS growth and
    weight bytes, and their ratios (goal: at most 1.1). Speed: time to first token and decode
    tokens/s per side, greedy, averaged over the prompts. Batching: `batching_ratios`.
    """
    import torch

    if not prompts:
        raise ChatError("bench_chat needs at least one prompt")
    adapter = str(run_dir)
    out: dict[str, Any] = {}
    if memory:
        base_alone = _in_child("base", adapter, model, precision, prompts[0])
        both = _in_child("engine", adapter, model, precision, prompts[0])
        out["memory"] = _memory_figures(base_alone, both)
    engine = ChatEngine()
    info = engine.load(adapter, model, precision)
    try:
        out.update(_side_speeds(engine, prompts, GenerationSettings(max_new_tokens=max_new_tokens)))
        out["batching"] = batching_ratios(
            engine, prompts, batch_prompts or BATCH_PROMPTS, ab_tokens, batch_tokens, reps
        )
    finally:
        engine.unload()
    return {
        "device": info.device,
        "precision": info.precision,
        "dtype": info.dtype,
        "base_model": info.base_model,
        "adapter": info.label,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "threads": torch.get_num_threads(),
        **out,
    }


def batching_ratios(
    engine: ChatEngine,
    ab_prompts: list[str],
    batch_prompts: list[str],
    ab_tokens: int = 128,
    batch_tokens: int = 32,
    reps: int = 3,
) -> dict[str, Any]:
    """What one batched pass is worth, as the user waits for it (greedy, after a warm-up):

    - an A/B turn (`compare_stream`): wall time both sides in one pass / A then B, with both
      sides held to exactly `ab_tokens` new tokens (the end token is held off), so the two
      ways do the same work (goal <= 0.65x on a 2-core CPU, <= 0.55x on a GPU);
    - the same turn at the answers' natural lengths: a batch runs until its longer answer
      ends, so where the fine-tune answers much shorter than the base it gains less;
    - batch compare: prompts/s with both sides of several prompts per call / one prompt
      and one side at a time (goal >= 3x).

    Each repetition times both ways back to back, alternating which goes first, and the
    per-repetition ratios give the median and the spread (min-max). The load average is
    read before and after (the machine may be shared).
    """
    fixed = GenerationSettings(max_new_tokens=ab_tokens, min_new_tokens=ab_tokens)
    natural = GenerationSettings(max_new_tokens=ab_tokens)
    bc = GenerationSettings(max_new_tokens=batch_tokens)
    chosen = engine.batch_sides  # each way is forced below; the engine's choice comes back
    items = [evaluate.BatchItem([{"role": "user", "content": p}]) for p in batch_prompts]
    load_before = load_averages()
    _ab_turn(engine, ab_prompts[0], GenerationSettings(max_new_tokens=4), True)  # warm-up
    series = {k: {"batched": [], "sequential": [], "ratio": []} for k in ("fixed", "natural")}
    rate: dict[str, list[float]] = {"batched": [], "one_at_a_time": [], "ratio": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(max(1, reps)):
            first = rep % 2 == 0  # a, b, b, a, ...: drift hits both ways alike
            prompt = ab_prompts[rep % len(ab_prompts)]
            for key, settings in (("fixed", fixed), ("natural", natural)):
                t = {mode: _ab_turn(engine, prompt, settings, mode) for mode in (first, not first)}
                _add_ratio(series[key], t[True], t[False], ("batched", "sequential"))
            r = {mode: _batch_rate(engine, items, bc, mode, tmp) for mode in (first, not first)}
            _add_ratio(rate, r[True], r[False], ("batched", "one_at_a_time"))
    engine.batch_sides = chosen
    why_not = batch_cost_problem(engine.model, 2)
    return {
        "ab_turn_choice": f"one after the other ({why_not})" if why_not else "one batched pass",
        "ab_turn": {"max_new_tokens": ab_tokens, **_spread(series["fixed"], "s")},
        "ab_turn_natural_length": {"max_new_tokens": ab_tokens, **_spread(series["natural"], "s")},
        "batch_compare": {
            "prompts": len(items),
            "prompts_per_call": evaluate.PROMPTS_PER_CALL,
            "max_new_tokens": batch_tokens,
            **_spread(rate, "prompts/s"),
        },
        "repetitions": max(1, reps),
        "load_average": {"before": load_before, "after": load_averages()},
    }


def _add_ratio(series: dict[str, list[float]], a: float, b: float, names: tuple[str, str]) -> None:
    """Record one repetition's two figures and their ratio a / b."""
    series[names[0]].append(a)
    series[names[1]].append(b)
    series["ratio"].append(a / b)


def _ab_turn(engine: ChatEngine, prompt: str, settings: GenerationSettings, batched: bool) -> float:
    """Seconds for one A/B turn through the engine, batched or A then B."""
    engine.batch_sides = batched
    history = [{"role": "user", "content": prompt}]
    started = time.perf_counter()
    for _ in engine.compare_stream({side: history for side in SIDES}, settings):
        pass
    return time.perf_counter() - started


def _batch_rate(
    engine: ChatEngine,
    items: list[evaluate.BatchItem],
    settings: GenerationSettings,
    batched: bool,
    out_dir: str,
) -> float:
    """Prompts/s of a batch compare: several prompts per call, or one prompt, one side at a
    time (the way it ran before batching)."""
    engine.batch_sides = batched
    size = evaluate.PROMPTS_PER_CALL if batched else 1
    started = time.perf_counter()
    evaluate.batch_compare(engine, items, settings, out_dir=out_dir, prompts_per_call=size)
    return len(items) / (time.perf_counter() - started)


def _spread(series: dict[str, list[float]], unit: str) -> dict[str, Any]:
    """Medians of each series, and the ratio's median and spread (min-max)."""
    out: dict[str, Any] = {
        f"{name}_{unit}": round(statistics.median(vals), 3)
        for name, vals in series.items()
        if name != "ratio"
    }
    ratios = series["ratio"]
    out["ratio_median"] = round(statistics.median(ratios), 3)
    out["ratio_spread"] = [round(min(ratios), 3), round(max(ratios), 3)]
    return out


def _side_speeds(
    engine: ChatEngine, prompts: list[str], settings: GenerationSettings
) -> dict[str, dict[str, float]]:
    """Mean time to first token, decode tokens/s and answer length per side (after a warm-up)."""
    per_side: dict[str, dict[str, list[float]]] = {
        s: {"ttft": [], "tps": [], "n": []} for s in SIDES
    }
    engine.generate(SIDE_BASE, [{"role": "user", "content": prompts[0]}], settings)  # warm-up
    for p in prompts:
        for side in SIDES:
            engine.generate(side, [{"role": "user", "content": p}], settings)
            st = engine.last_stats[side]
            per_side[side]["ttft"].append(st.ttft_s or 0.0)
            per_side[side]["tps"].append(st.tokens_per_s)
            per_side[side]["n"].append(st.new_tokens)

    def avg(xs: list[float]) -> float:
        return round(sum(xs) / len(xs), 4) if xs else 0.0

    return {
        SIDE_LABELS[side]: {
            "ttft_s": avg(per_side[side]["ttft"]),
            "tokens_per_s": avg(per_side[side]["tps"]),
            "new_tokens": avg(per_side[side]["n"]),
        }
        for side in SIDES
    }


def _memory_figures(base_alone: dict[str, Any], both: dict[str, Any]) -> dict[str, float]:
    """Both sides vs the base alone, in MB and as ratios (the goal is at most 1.1)."""
    memory = {
        "base_alone_rss_mb": round(base_alone["rss_delta"] / 2**20, 1),
        "both_sides_rss_mb": round(both["rss_delta"] / 2**20, 1),
        "rss_ratio": round(both["rss_delta"] / max(base_alone["rss_delta"], 1), 3),
        "base_alone_weights_mb": round(base_alone["tensor_bytes"] / 2**20, 1),
        "both_sides_weights_mb": round(both["tensor_bytes"] / 2**20, 1),
        "weights_ratio": round(both["tensor_bytes"] / max(base_alone["tensor_bytes"], 1), 4),
    }
    if base_alone.get("cuda_allocated"):
        memory["cuda_ratio"] = round(both["cuda_allocated"] / base_alone["cuda_allocated"], 3)
    return memory


def newest_run() -> str:
    """The newest run that has an adapter (the default run to benchmark)."""
    from studio.runs import list_runs

    runs = list_runs(chattable=True)
    if not runs:
        raise ChatError("No run with an adapter yet: train one, or pass a run or adapter folder.")
    return str(runs[0].path)


def batching_lines(b: dict[str, Any]) -> list[str]:
    """The batching figures as the lines `python -m studio.bench chat` prints."""
    t, n, r = b["ab_turn"], b["ab_turn_natural_length"], b["batch_compare"]
    return [
        f"A/B turn, both sides {t['max_new_tokens']} new tokens: batched {t['batched_s']:.2f} s"
        f" vs A then B {t['sequential_s']:.2f} s -> ratio {t['ratio_median']:.3f}x median (spread"
        f" {t['ratio_spread'][0]:.3f}-{t['ratio_spread'][1]:.3f}; goal <= 0.65x on CPU)",
        f"A/B turn at natural lengths (up to {n['max_new_tokens']}): batched {n['batched_s']:.2f} s"
        f" vs A then B {n['sequential_s']:.2f} s -> ratio {n['ratio_median']:.3f}x median (spread"
        f" {n['ratio_spread'][0]:.3f}-{n['ratio_spread'][1]:.3f})",
        f"batch compare, {r['prompts']} prompts x 2 sides, {r['max_new_tokens']} tokens:"
        f" {r['batched_prompts/s']:.3f} prompts/s ({r['prompts_per_call']} per call) vs"
        f" {r['one_at_a_time_prompts/s']:.3f} one at a time -> {r['ratio_median']:.2f}x median"
        f" (spread {r['ratio_spread'][0]:.2f}-{r['ratio_spread'][1]:.2f}; goal >= 3x)",
        f"the studio's own choice for an A/B turn here: {b.get('ab_turn_choice', '?')}",
        f"{b['repetitions']} interleaved repetitions; load average before"
        f" {b['load_average']['before']}, after {b['load_average']['after']} (shared machine)",
    ]


# --------------------------------------------------------------------------- the command

HELP = "chat memory (both sides vs base alone) and speed"
_CHAT_PROMPTS = [
    "My parcel has not arrived after two weeks. What should I do?",
    "Tôi bị trừ tiền hai lần cho cùng một đơn hàng, làm sao để được hoàn tiền?",
    "How do I reset my password if the email never arrives?",
]


def run(args: argparse.Namespace) -> int:
    """Memory with both chat sides ready vs the base alone, and per-side speed."""
    result = bench_chat(
        args.model,
        args.run_dir or newest_run(),
        _CHAT_PROMPTS,
        max_new_tokens=args.tokens,
        ab_tokens=args.ab_tokens,
        batch_tokens=args.batch_tokens,
        reps=args.reps,
        memory=not args.no_memory,
    )
    result["machine"] = machine()
    for key, value in result.items():
        if key != "batching":
            print(f"{key}: {value}")
    print("\n".join(batching_lines(result["batching"])))
    write_results(args, "chat", result)
    return 0


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir", nargs="?", help="a run or adapter folder (default: the newest run with one)"
    )
    p.add_argument("--model", help="base model (default: the run's own)")
    p.add_argument("--tokens", type=int, default=64, help="max new tokens per answer (64)")
    p.add_argument("--ab-tokens", type=int, default=128, help="new tokens per A/B turn (128)")
    p.add_argument("--batch-tokens", type=int, default=32, help="batch compare tokens (32)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (3)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory figures")
    p.add_argument("--json", help="also write the results to this JSON file")
