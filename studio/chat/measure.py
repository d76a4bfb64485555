"""Chat benchmark: memory of both sides vs the base alone, time to first token, tokens/s.

Run by `python -m studio.bench chat` (`bench_chat` returns the figures, prints nothing). Each
memory figure is taken in a fresh child process (`_in_child` -> `_measure_load`), so memory
freed by an earlier load cannot blur the comparison.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from studio import paths
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
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env[paths.ENV_VAR] = str(paths.data_dir())
    code = (
        "import sys, json; from studio.chat.measure import _measure_load;"
        " _measure_load(*json.loads(sys.argv[1]))"
    )
    args = json.dumps([kind, adapter, base, precision, prompt])
    done = subprocess.run(
        [sys.executable, "-c", code, args],
        capture_output=True,
        text=True,
        env=env,
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


def bench_chat(
    model: str | None,
    run_dir: str | Path,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    precision: str = PRECISION_AUTO,
) -> dict[str, Any]:
    """Measure chat memory and speed; returns figures, prints nothing.

    Memory: the base alone vs the chat engine with both sides ready (each loaded in its own
    fresh process, after one generation so working buffers count): process RSS growth and
    weight bytes, and their ratios (goal: at most 1.1). Speed: time to first token and decode
    tokens/s per side, greedy, averaged over the prompts.
    """
    import torch

    if not prompts:
        raise ChatError("bench_chat needs at least one prompt")
    adapter = str(run_dir)
    base_alone = _in_child("base", adapter, model, precision, prompts[0])
    both = _in_child("engine", adapter, model, precision, prompts[0])
    engine = ChatEngine()
    info = engine.load(adapter, model, precision)
    try:
        speed = _side_speeds(engine, prompts, GenerationSettings(max_new_tokens=max_new_tokens))
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
        "memory": _memory_figures(base_alone, both),
        **speed,
    }


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
