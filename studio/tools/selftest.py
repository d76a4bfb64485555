"""The engine end to end on this machine: `python -m studio.doctor --selftest`.

A random-weight model in Qwen2.5-0.5B's shape (Llama layers, two of them, the embedded
vocabulary; built by `studio.models.tiny`) goes through what a user's run goes through, on
this machine's device: LoRA on the 16-bit base and QLoRA on the NF4 base (3 steps each, the
real recipe through `studio.train.jobs.run_training`), one streamed A/B chat turn, a merge
and an f16 GGUF export verified by loading it back. Each case reports the VRAM estimate
next to the measured peak (the run's metadata records both). The architecture tests
(tests/test_architectures.py) run the same `run_case` on tiny Qwen2/Qwen3/Gemma/Llama models.
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

SELFTEST_STEPS = 3


QUESTIONS = ["Where is my order?", "How do I reset my password?", "Can I get a refund?"]


def write_dataset(folder: Path, rows: int = 12) -> Path:
    """A small chat dataset (system, user, assistant; no personal data) as JSONL."""
    path = Path(folder) / "selftest_rows.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        q = QUESTIONS[i % len(QUESTIONS)]
        messages = [
            {"role": "system", "content": "You are a support agent. Answer in JSON."},
            {"role": "user", "content": f"{q} (ticket {i})"},
            {"role": "assistant", "content": json.dumps({"ticket": i, "topic": q[:12]})},
        ]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def presets_recipe(device: str) -> dict[str, Any]:
    """What the presets train with on this device (`device` "auto" asks torch): their
    optimizer (paged 8-bit AdamW on every GPU preset), and gradient checkpointing, which
    every band from 1B up turns on. The dtype follows the card (`precision`) as in a run.
    A self-test on another recipe would pass on a card where the users' runs fail."""
    from studio.hardware.presets import load_presets

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if device.startswith("cuda") else "cpu"
    preset = next(p for p in load_presets().presets.values() if p.kind == kind)
    return {"optimizer": preset.bands["up_to_1b"].optimizer, "gradient_checkpointing": True}


def selftest_config(model_dir: Path, method: str, device: str, steps: int) -> Any:
    """A short run on a small written dataset in the presets' recipe: few steps, short rows,
    every check kept."""
    from studio.config import RunConfig

    return RunConfig(
        **presets_recipe(device),
        run_name=f"selftest-{method}",
        base_model=str(model_dir),
        dataset_path=str(write_dataset(Path(model_dir).parent)),
        method=method,
        max_steps=steps,
        batch_size=2,
        max_seq_len=128,
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-3,
        target_modules="attention",
        val_fraction=0.05,
        device=device,
    )


def chat_turn(run_dir: Path, device: str) -> dict[str, str]:
    """One streamed A/B turn (base, then fine-tuned) through the Chat tab's engine."""
    from studio.chat import engine as chat

    eng = chat.ChatEngine()
    try:
        eng.load(run_dir, device=None if device == "auto" else device)
        messages = [{"role": "user", "content": "My order has not arrived. What can I do?"}]
        settings = chat.GenerationSettings(temperature=0.0, max_new_tokens=8)
        answers = dict.fromkeys(chat.SIDES, "")
        for side, chunk in eng.compare_stream({s: messages for s in chat.SIDES}, settings):
            answers[side] += chunk
        return answers
    finally:
        eng.unload()


def run_case(
    model_dir: Path, method: str, device: str = "auto", *, steps: int = 2, export: bool = True
) -> dict[str, Any]:
    """Train, chat A/B, merge and export one model; plain data of what happened."""
    from studio import runs
    from studio.export.run import export_run
    from studio.train.jobs import run_training

    case: dict[str, Any] = {"model": Path(model_dir).name, "method": method}
    t0 = time.time()
    result = run_training(selftest_config(Path(model_dir), method, device, steps))
    meta = runs.read_metadata(result.run_dir)
    case.update(
        run_dir=str(result.run_dir),
        train_status=result.status,
        train_message=result.message,
        device=(meta.get("device") or {}).get("used"),
        loss_head=(meta.get("recipe") or {}).get("loss_head"),
        optimizer=(meta.get("settings") or {}).get("optimizer"),
        gradient_checkpointing=(meta.get("settings") or {}).get("gradient_checkpointing"),
        precision=(meta.get("recipe") or {}).get("precision"),
        memory=meta.get("memory") or {},
        train_s=round(time.time() - t0, 1),
    )
    if result.status != "completed":
        return case
    case["chat"] = chat_turn(result.run_dir, device)
    if export:
        t1 = time.time()
        done = export_run(result.run_dir, gguf="f16", max_new_tokens=8, n_prompts=2)
        case.update(
            merge_passed=done.merge_check.passed,
            gguf_path=done.gguf_path,
            gguf_passed=None if done.gguf_check is None else done.gguf_check.passed,
            export_warnings=done.warnings,
            export_s=round(time.time() - t1, 1),
        )
    return case


def run_selftest(work_dir: Path | None = None, device: str = "auto", layers: int = 2) -> dict:
    """Build the reference-shaped model, run the LoRA and QLoRA cases; never raises."""
    from studio import paths
    from studio.models import tiny

    work = Path(work_dir or tempfile.mkdtemp(prefix="lora-studio-selftest-"))
    # Llama's layers in Qwen2.5-0.5B's sizes: llama.cpp's converter refuses the embedded
    # tokenizer on the Qwen2 architecture (tests/test_architectures.py says why).
    model_dir = tiny.build_model(
        "llama", work / "qwen2.5-0.5b-shaped", shape=tiny.QWEN25_05B, layers=layers
    )
    report: dict[str, Any] = {"model": "Qwen2.5-0.5B shape", "layers": layers, "cases": []}
    report["data_dir"] = str(paths.data_dir())
    t0 = time.time()
    for method in ("lora", "qlora"):
        try:
            report["cases"].append(run_case(model_dir, method, device, steps=SELFTEST_STEPS))
        except Exception as exc:  # a broken case is a result, not a crash
            report["cases"].append(
                {"method": method, "error": f"{type(exc).__name__}: {exc}",
                 "traceback": traceback.format_exc()}
            )  # fmt: skip
    report["seconds"] = round(time.time() - t0, 1)
    report["passed"] = all(case_passed(c) for c in report["cases"])
    return report


def case_passed(case: dict[str, Any]) -> bool:
    return (
        case.get("train_status") == "completed"
        and bool(case.get("chat"))
        and case.get("merge_passed") is True
        and case.get("gguf_passed") in (True, None)
        and case.get("gguf_path") is not None
    )


def table(report: dict[str, Any]) -> str:
    """One line per case: status, device, loss head, estimate vs measured peak (MiB)."""

    def mib(value: Any) -> str:
        return "-" if value is None else f"{value / 2**20:,.0f}"

    head = (
        "method  ok    device  train_s  export_s  estimate  est_alloc  max_reserved  max_alloc/rss"
    )
    lines = [head]
    for c in report["cases"]:
        m = c.get("memory") or {}
        peak = m.get("max_memory_allocated", m.get("measured_rss_bytes"))
        lines.append(
            f"{c['method']:<7} {'yes' if case_passed(c) else 'NO':<5} {c.get('device') or '-':<7}"
            f" {c.get('train_s', '-'):>7} {c.get('export_s', '-'):>9}"
            f" {mib(m.get('estimate_bytes')):>9} {mib(m.get('estimate_allocated_bytes')):>10}"
            f" {mib(m.get('max_memory_reserved')):>13} {mib(peak):>13}"
        )
        if c.get("error"):
            lines.append(f"        error: {c['error']}")
    return "\n".join(lines)


def main(out: str | None = None, device: str = "auto") -> int:
    """Run, print the table, write the JSON report; exit 1 when a case failed."""
    report = run_selftest(Path(out).parent / "selftest-work" if out else None, device=device)
    path = Path(out or Path(report["data_dir"]) / "selftest.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(table(report))
    print(
        f"\n{'passed' if report['passed'] else 'FAILED'} in {report['seconds']} s; report: {path}"
    )
    return 0 if report["passed"] else 1
