"""`python -m studio.bench gpu [--tiny]`: one script that proves the GPU path on a lent card.

No GPU is at hand while the studio is built, and a lent one comes for minutes: this script
runs everything a card must show, in one go, in under 8 minutes on one card, and writes one
JSON report (`gpu-<card>.json`) and a table. Each section is a result, never a crash:

- doctor: the checks of `python -m studio.doctor`;
- selftest: LoRA and QLoRA with the presets' recipe (paged 8-bit AdamW, checkpointing, the
  card's dtype), an A/B chat turn, a merge and a GGUF export checked on the GPU;
- train: the studio's recipe against the tutorial's (plain transformers + PEFT), interleaved
  step by step, on the embedded model and on random-weight models with the real shapes of
  Qwen2.5-1.5B (LoRA) and Llama-3.1-8B (QLoRA): tokens/s, MFU, the VRAM estimate next to
  the measured peak (random weights measure speed and memory truthfully, with no hub);
- long_context: the longest sequence that trains for Llama-3.1-8B QLoRA r32 batch 1 within
  12 GiB (`torch.cuda.set_per_process_memory_fraction` caps a bigger card) with TRL's activation
  offloading, Liger's kernels and the tiled MLP on, and the estimate's answer with and without;
- chat: the A/B turn in one pass against A then B, and the per-row adapter switch on a 4-bit
  base (each side's greedy text the same as alone).

`--tiny` runs the same sections on the CPU with tiny shapes (CI keeps the script working);
the long-context search needs CUDA and says so there.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from studio.tools.common import machine

HELP = "the GPU path end to end: doctor, self-test, speed and memory, long context, A/B"

# Random-weight models with real shapes: (key, transformers family, reference shape, method).
SHAPES = [
    ("qwen2.5-1.5b", "qwen2", "Qwen/Qwen2.5-1.5B-Instruct", "lora"),
    ("llama-3.1-8b", "llama", "meta-llama/Llama-3.1-8B-Instruct", "qlora"),
]
LONG_CONTEXT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
LONG_CONTEXT_GOAL = 21_848  # Unsloth's published figure for the same run on a 12 GB card
CARD_CAP_GIB = 12
_SHAPE_KEYS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "tie_word_embeddings", "rope_theta", "rms_norm_eps",
)  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (CI)")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per recipe")
    p.add_argument("--json", help="where to write the report (default: the data dir)")
    p.add_argument("--work-dir", help="where the random-weight models go (default: a temp dir)")


def run(args: argparse.Namespace) -> int:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("No CUDA GPU here: `python -m studio.bench gpu --tiny` checks the script on CPU.")
        return 2
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lora-studio-gpu-"))
    try:
        return _run_sections(args, device, work)
    finally:
        if not args.work_dir:  # the random-weight models: gigabytes at the real shapes
            shutil.rmtree(work, ignore_errors=True)


def _run_sections(args: argparse.Namespace, device: str, work: Path) -> int:
    ctx = {"device": device, "tiny": args.tiny, "steps": args.steps, "work": work}
    report: dict[str, Any] = {"machine": machine(), "card": _card(device), "tiny": args.tiny}
    started = time.time()
    for name, section in SECTIONS:
        t0 = time.time()
        print(f"[{time.time() - started:6.0f} s] {name} ...", flush=True)
        try:
            result = section(ctx)
        except Exception as exc:  # one broken section is a finding, the others still run
            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        result["seconds"] = round(time.time() - t0, 1)
        report[name] = ctx[f"_{name}"] = result
    report["seconds"] = round(time.time() - started, 1)
    print(table(report))
    path = _report_path(args, report["card"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str, ensure_ascii=False), "utf-8")
    print(f"report: {path}")
    return 0 if not any("error" in v for v in report.values() if isinstance(v, dict)) else 1


def _card(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)


def _report_path(args: argparse.Namespace, card: str) -> Path:
    from studio import paths

    if args.json:
        return Path(args.json)
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "cpu"
    return paths.data_dir() / "bench_results" / f"gpu-{slug}.json"


# --------------------------------------------------------------------------- sections


def doctor_section(ctx: dict[str, Any]) -> dict[str, Any]:
    from studio.hardware import doctor

    checks = doctor.checks_as_dicts()
    return {"checks": checks, "problems": [c for c in checks if c.get("status") == doctor.PROBLEM]}


def selftest_section(ctx: dict[str, Any]) -> dict[str, Any]:
    """The doctor's self-test as it is; `--tiny`: one layer of the tiny shape, no export."""
    from studio.models import tiny
    from studio.tools import selftest

    if not ctx["tiny"]:
        return selftest.run_selftest(ctx["work"] / "selftest", device=ctx["device"])
    model = tiny.build_model("llama", ctx["work"] / "tiny-llama", layers=1)
    ctx["selftest_model"] = model
    cases = [
        selftest.run_case(model, m, ctx["device"], steps=1, export=False) for m in ("lora", "qlora")
    ]
    return {"cases": cases, "passed": all(c.get("train_status") == "completed" for c in cases)}


def train_section(ctx: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of the studio's recipe against the tutorial's, per model, with memory."""
    from studio.models import loader

    models: list[tuple[str, Path, str]] = [
        ("embedded", loader.ensure_embedded_model().path, "lora")
    ]
    if ctx["tiny"]:
        models = [("tiny-llama", ctx.get("selftest_model") or _tiny(ctx), "lora")]
    else:
        models += [(key, _real_shape(ctx, key, fam, ref), m) for key, fam, ref, m in SHAPES]
    out: dict[str, Any] = {}
    for key, folder, method in models:
        try:
            out[key] = _throughput(ctx, folder, method)
        except Exception as exc:
            out[key] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def long_context_section(ctx: dict[str, Any]) -> dict[str, Any]:
    """The longest sequence that trains in 12 GiB with TRL's activation offloading, Liger's
    kernels (where this machine has them) and the tiled MLP on, measured, next to the
    estimate's: with all three, without the tiled MLP, without any, and with LoRA dropout 0
    (Unsloth's notebooks' setting; the studio's presets use 0.05)."""
    from studio.hardware import vram

    shape = vram.model_shape(LONG_CONTEXT_MODEL)
    cap = CARD_CAP_GIB * vram.GIB

    def estimate_longest(options: bool, dropout: float = 0.05, tiled: bool = True) -> int | None:
        def fits(n: int) -> bool:
            settings = _long_settings(n) | {"lora_dropout": dropout}
            est = vram.estimate(shape, settings, capacity_bytes=cap, offload_activations=options,
                                liger_kernels=options, tiled_mlp=options and tiled)  # fmt: skip
            return est.verdict != "won't fit"

        return _longest(fits)

    result: dict[str, Any] = {
        "goal": LONG_CONTEXT_GOAL,
        "estimate_longest": estimate_longest(True),
        "estimate_longest_without_tiled_mlp": estimate_longest(True, tiled=False),
        "estimate_longest_without_options": estimate_longest(False),
        "estimate_longest_dropout_0": estimate_longest(True, 0.0),
    }
    if ctx["device"] != "cuda":
        result["measured_longest"] = None
        result["note"] = "needs CUDA: the cap is torch.cuda.set_per_process_memory_fraction"
        return result
    folder = _real_shape(ctx, "llama-3.1-8b", "llama", LONG_CONTEXT_MODEL)
    result["measured_longest"] = _longest(lambda n: _trains_at(ctx, folder, n, cap))
    return result


def chat_section(ctx: dict[str, Any]) -> dict[str, Any]:
    """The A/B turn both ways on a LoRA run, and the per-row switch on a QLoRA run."""
    from studio.chat.engine import ChatEngine
    from studio.tools.chat import BATCH_PROMPTS, batching_lines, batching_ratios

    runs = _selftest_runs(ctx)
    out: dict[str, Any] = {}
    for method in ("lora", "qlora"):
        if method not in runs:
            out[method] = {"error": "no completed self-test run to chat with"}
            continue
        engine = ChatEngine()
        try:
            engine.load(runs[method])
            tokens = 8 if ctx["tiny"] else 128
            ratios = batching_ratios(engine, ["Where is my order?"], BATCH_PROMPTS[:2],
                                     tokens, tokens // 4, 1 if ctx["tiny"] else 3)  # fmt: skip
            out[method] = {"batching": ratios, "lines": batching_lines(ratios),
                           "same_as_alone": _same_as_alone(engine)}  # fmt: skip
        finally:
            engine.unload()
    return out


SECTIONS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = [
    ("doctor", doctor_section),
    ("selftest", selftest_section),
    ("train", train_section),
    ("long_context", long_context_section),
    ("chat", chat_section),
]


# --------------------------------------------------------------------------- helpers


def _tiny(ctx: dict[str, Any]) -> Path:
    from studio.models import tiny

    return tiny.build_model("llama", ctx["work"] / "tiny-llama", layers=1)


def _real_shape(ctx: dict[str, Any], key: str, family: str, reference: str) -> Path:
    """A random-weight model with `reference`'s real shape and vocabulary (built once)."""
    from studio.hardware import vram
    from studio.models import tiny

    folder = ctx["work"] / key
    if (folder / "config.json").exists():
        return folder
    ref = vram.REFERENCE_CONFIGS[reference]
    shape = {k: ref[k] for k in _SHAPE_KEYS if k in ref}
    return tiny.build_model(family, folder, shape=shape, layers=ref["num_hidden_layers"],
                            vocab_size=ref["vocab_size"])  # fmt: skip


def _throughput(ctx: dict[str, Any], folder: Path, method: str) -> dict[str, Any]:
    """bench train's interleaved (a) tutorial vs (b) studio on one model."""
    from studio import paths
    from studio.config import RunConfig
    from studio.tools.train import run_interleaved

    steps = 1 if ctx["tiny"] else ctx["steps"]
    cfg = RunConfig(
        base_model=str(folder), method=method, max_seq_len=128 if ctx["tiny"] else 512,
        batch_size=2 if ctx["tiny"] else 4, grad_accum=1, max_steps=steps + 1,
        learning_rate=2e-4, warmup_ratio=0.0, target_modules="qv", device=ctx["device"],
    ).validate()  # fmt: skip
    base = {"cfg": cfg.to_dict(), "model_path": str(folder), "rows": 8 if ctx["tiny"] else 64}
    base |= {"device": ctx["device"], "tmp": str(ctx["work"] / "train"),
             "data_dir": str(paths.data_dir())}  # fmt: skip
    jobs = [{**base, "key": k, "builder": k, "undo": {}, "index": i}
            for i, k in enumerate(("tutorial", "studio"))]  # fmt: skip
    found = run_interleaved(jobs, warm=1)
    keep = ("tokens_per_s", "labelled_tokens_per_s", "peak_memory_mb", "memory_kind",
            "precision", "mfu", "vram_estimate_mb", "vram_measured_mb", "final_loss")  # fmt: skip
    out = {k: {f: v.get(f) for f in keep if f in v} for k, v in found.items()}
    a, b = found["tutorial"], found["studio"]
    out["ratio_labelled_tokens_per_s"] = round(
        b["labelled_tokens_per_s"] / max(a["labelled_tokens_per_s"], 1e-9), 2
    )
    return out


def _long_settings(seq_len: int) -> dict[str, Any]:
    return {"method": "qlora", "lora_r": 32, "lora_alpha": 64, "target_modules": "all_linear",
            "batch_size": 1, "grad_accum": 1, "max_seq_len": seq_len,
            "gradient_checkpointing": True, "optimizer": "paged_adamw_8bit"}  # fmt: skip


def _longest(fits: Callable[[int], bool], low: int = 1024, high: int = 65_536) -> int | None:
    """The longest length (a multiple of 256) for which `fits` holds: doubling, then halving
    the gap. None when even `low` does not fit."""
    if not fits(low):
        return None
    good = low
    while good * 2 <= high and fits(good * 2):
        good *= 2
    bad = min(good * 2, high + 256)
    while bad - good > 256:
        mid = (good + bad) // 2 // 256 * 256
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _trains_at(ctx: dict[str, Any], folder: Path, seq_len: int, cap_bytes: int) -> bool:
    """Whether one optimizer step of the studio's QLoRA recipe fits under the cap at
    `seq_len` tokens (a fresh process each time: a CUDA out-of-memory leaves fragments)."""
    import subprocess
    import sys

    code = (
        "import sys; from studio.tools.gpu import one_long_step;"
        f" sys.exit(0 if one_long_step({str(folder)!r}, {seq_len}, {cap_bytes}) else 3)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=600, check=False)  # fmt: skip
    return done.returncode == 0


def one_long_step(folder: str, seq_len: int, cap_bytes: int) -> bool:
    """One training step at `seq_len` through the studio's recipe, under a memory cap."""
    import torch

    from studio.config import RunConfig
    from studio.hardware.longctx import for_run
    from studio.train import recipe

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_bytes / total))
    cfg = RunConfig(base_model=folder, max_steps=1, device="cuda", **_long_settings(seq_len))
    cfg.activation_offloading = cfg.liger_kernels = cfg.tiled_mlp = "on"  # off where missing
    rows = [{"input_ids": list(range(10, 10 + seq_len)), "completion_mask": [1] * seq_len}]
    try:
        model = recipe.load_base_model(cfg, Path(folder), "cuda")
        options = for_run(cfg, folder, "cuda")
        print("\n".join(options.lines()), flush=True)
        args = recipe.build_training_args(
            cfg, Path(tempfile.mkdtemp()), "cuda", False, False, long_context=options
        )
        args.save_strategy = "no"
        from studio.models.loader import load_tokenizer

        callbacks = recipe.long_context_callbacks(options)
        tok = load_tokenizer(folder)
        trainer = recipe.build_trainer(cfg, model, tok, args, "cuda", rows, callbacks=callbacks)
        trainer.train()
        return True
    except torch.OutOfMemoryError:
        return False


def _selftest_runs(ctx: dict[str, Any]) -> dict[str, str]:
    """method -> run folder of the self-test's completed cases."""
    cases = (ctx.get("_selftest") or {}).get("cases") or []
    return {c["method"]: c["run_dir"] for c in cases if c.get("train_status") == "completed"}


def _same_as_alone(engine: Any) -> bool:
    """Both sides batched (the per-row switch) give each side's greedy text alone."""
    from studio.chat.engine import SIDES, GenerationSettings

    settings = GenerationSettings(temperature=0.0, max_new_tokens=8)
    messages = [{"role": "user", "content": "My order has not arrived."}]
    engine.batch_sides = True
    together = dict.fromkeys(SIDES, "")
    for side, chunk in engine.compare_stream({s: messages for s in SIDES}, settings):
        together[side] += chunk
    engine.batch_sides = None
    alone = {s: engine.generate(s, messages, settings) for s in SIDES}
    return all(together[s].strip() == alone[s].strip() for s in SIDES)


def table(report: dict[str, Any]) -> str:
    """The figures a reader wants first, one line each."""
    lines = [f"GPU benchmark on {report['card']} ({report['machine']}), {report['seconds']} s"]
    for name, _ in SECTIONS:
        section = report.get(name) or {}
        if "error" in section:
            lines.append(f"{name:13s} ERROR {section['error']}")
            continue
        lines.append(f"{name:13s} {section.get('seconds')} s  {_summary(name, section)}")
    return "\n".join(lines)


def _summary(name: str, s: dict[str, Any]) -> str:
    if name == "doctor":
        return f"{len(s['checks'])} checks, {len(s['problems'])} problems"
    if name == "selftest":
        return f"passed: {s.get('passed')}"
    if name == "train":
        return "; ".join(
            f"{k}: {v.get('ratio_labelled_tokens_per_s', v.get('error'))}x label tokens/s"
            for k, v in s.items() if isinstance(v, dict)
        )  # fmt: skip
    if name == "long_context":
        return (f"measured {s.get('measured_longest')} tokens, estimate"
                f" {s.get('estimate_longest')} (without the tiled MLP"
                f" {s.get('estimate_longest_without_tiled_mlp')}, with no option"
                f" {s.get('estimate_longest_without_options')}), goal {s['goal']}")  # fmt: skip
    return "; ".join(
        f"{m}: {(v.get('lines') or ['?'])[1] if 'lines' in v else v.get('error')},"
        f" same as alone {v.get('same_as_alone')}"
        for m, v in s.items() if isinstance(v, dict)
    )  # fmt: skip
