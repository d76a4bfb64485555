"""`python -m studio.bench firstrun`: the default first run on the sample, headless.

The bundled sample redacted (as the Dataset tab's Redact), the CPU preset's defaults, no
edits. Prints minutes to finish, the did-it-learn verdicts, and on the validation split the
format rate and ROUGE-L, base vs fine-tune.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from studio.tools.common import load_average, machine, write_results

HELP = "the default first run on the sample: time, did-it-learn, base vs fine-tune"


def _firstrun_dataset(allow_pii: bool) -> tuple[Path, str]:
    """The bundled sample as a new user trains it: a redacted copy (the Dataset tab's Redact,
    `studio.data.pii.write_cleaned`), or the sample itself with allow_pii."""
    from studio.data import load as data

    if allow_pii:
        return data.SAMPLE_DATASET, "the bundled sample (PII allowed)"
    from studio.data import pii

    report = data.load_dataset_file(data.SAMPLE_DATASET)
    cleaned = pii.write_cleaned(report.rows, data.SAMPLE_DATASET, "redact")
    return cleaned.path, f"a redacted copy of the bundled sample ({cleaned.findings_fixed} fixed)"


def _firstrun_config(dataset: Path, allow_pii: bool, max_steps: int) -> tuple[Any, str]:
    """The default run as the Train tab fills it with no edits: the CPU preset's band defaults
    for the default model, sized to the dataset by `studio.train.plan.plan_run` where it
    exists, the RunConfig defaults for everything else. Returns the config and the plan's
    line (so the figures always say which recipe they measured)."""
    from studio.config import RunConfig
    from studio.hardware import presets
    from studio.hardware.vram import model_shape
    from studio.models import loader

    cpu = next(p for p in presets.load_presets().presets.values() if p.kind == "cpu")
    n_params = model_shape(loader.DEFAULT_MODEL).n_params
    known = set(RunConfig.__dataclass_fields__)
    settings = {k: v for k, v in presets.defaults_for(cpu, n_params).items() if k in known}
    cfg = RunConfig(run_name="firstrun", dataset_path=str(dataset), allow_pii=allow_pii, **settings)
    try:
        from studio.train.plan import plan_run

        tok = loader.load_tokenizer(loader.resolve_model(cfg.base_model).path)
        planned = plan_run(cfg, tok)
        cfg, line = cfg.replace(**planned.settings), planned.line or "; ".join(planned.problems)
    except (ImportError, AttributeError, TypeError) as exc:  # no planner: the band's values
        line = f"no recipe plan ({exc})"
    if max_steps:
        cfg = cfg.replace(max_steps=max_steps)
    return cfg.validate(), line


def _firstrun_scores(run_dir: Path, val_rows: int) -> dict[str, Any]:
    """Base vs fine-tune on the run's validation split, loaded as the Chat tab loads it:
    the share of answers in the dataset's format, complete JSON, and mean ROUGE-L."""
    from studio.chat import evaluate
    from studio.chat.engine import ChatEngine
    from studio.data import scores
    from studio.train import checks

    items = evaluate.validation_items(run_dir, limit=val_rows or None)
    rows = [
        {"messages": [*it.messages, {"role": "assistant", "content": it.reference or ""}]}
        for it in items
    ]
    engine = ChatEngine()
    engine.load(run_dir)
    try:
        picked, limit = checks.pick_samples(engine.tokenizer, rows, n=len(rows))
        samples: list[dict[str, Any]] = []
        for i in range(0, len(picked), 8):  # batches of 8 keep padding and memory modest
            samples += checks.sample_answers(
                engine.model, engine.tokenizer, picked[i : i + 8], limit
            )
    finally:
        engine.unload()
    fmt = checks.answer_format([s["reference"] for s in samples])
    out: dict[str, Any] = {"val_rows": len(samples), "max_new_tokens": limit}
    out["format"] = fmt["label"] if fmt else None
    if fmt:
        out["base_format_rate"], out["tuned_format_rate"] = checks.format_rates(samples, fmt)
    for side in ("base", "tuned"):
        n = max(1, len(samples))
        out[f"{side}_rouge_l"] = round(
            sum(scores.rouge_l(s[side], s["reference"]) for s in samples) / n, 4
        )
        out[f"{side}_json_complete"] = round(
            sum(bool(scores.json_format_ok(s[side], s["reference"])) for s in samples) / n, 4
        )
    out["example"] = next(({k: s[k] for k in ("prompt", "base", "tuned")} for s in samples), None)
    return out


def run(args: argparse.Namespace) -> int:
    """The default click-through, headless: sample (redacted), CPU preset, Start, no edits."""
    from studio import paths
    from studio.train import checks
    from studio.train.jobs import execute_run
    from studio.train.prepare import prepare_run

    if args.data_dir:
        paths.set_data_dir(args.data_dir)
    dataset, what = _firstrun_dataset(args.allow_pii)
    cfg, line = _firstrun_config(dataset, args.allow_pii, args.max_steps)
    print(f"firstrun: {what}; {line}; load {load_average()}", flush=True)
    t0 = time.perf_counter()
    result = execute_run(prepare_run(cfg))
    minutes = (time.perf_counter() - t0) / 60
    if result.status != "completed":
        print(f"the run ended {result.status}: {result.message}", file=sys.stderr)
        return 1
    meta = json.loads((result.run_dir / "training_metadata.json").read_text(encoding="utf-8"))
    timings = meta.get("timings") or {}
    print(
        f"minutes to finish: {minutes:.2f} (train {timings.get('train_s', 0) / 60:.2f},"
        f" answer checks {timings.get('answer_checks_s', 0):.0f} s);"
        f" {result.final_metrics.get('step')} steps (goal <= 5 min)"
    )
    print("did it learn?")
    for c in result.checks:
        print(f"  [{checks.verdict_of(c)}] {c['name']}: {c['detail']}")
        if c.get("fix") and checks.verdict_of(c) in ("amber", "red"):
            print(f"      -> {c['fix']}")
    scores = _firstrun_scores(result.run_dir, args.val_rows)
    _print_firstrun_scores(scores)
    results = {
        "machine": machine(),
        "load_average_at_start": load_average(),
        "run_dir": str(result.run_dir),
        "plan": line,
        "settings": cfg.to_dict(),
        "minutes": round(minutes, 2),
        "timings": timings,
        "final_metrics": result.final_metrics,
        "checks": {c["name"]: checks.verdict_of(c) for c in result.checks},
        "validation": scores,
    }
    write_results(args, "firstrun", results)
    return 0


def _print_firstrun_scores(s: dict[str, Any]) -> None:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    print(
        f"validation split ({s['val_rows']} rows, greedy, up to {s['max_new_tokens']} tokens):"
        f" format ({s['format'] or 'none shared'}) base {pct(s.get('base_format_rate'))}"
        f" vs fine-tune {pct(s.get('tuned_format_rate'))} (goal: fine-tune >= 80%,"
        f" base <= 20%); complete JSON base {pct(s['base_json_complete'])} vs fine-tune"
        f" {pct(s['tuned_json_complete'])}; ROUGE-L base {s['base_rouge_l']:.3f} vs"
        f" fine-tune {s['tuned_rouge_l']:.3f}"
    )


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-steps", type=int, default=0, help="cap the steps (0: the default plan)")
    p.add_argument("--val-rows", type=int, default=0, help="validation rows to score (0: all)")
    p.add_argument("--allow-pii", action="store_true", help="train the sample unredacted")
    p.add_argument("--data-dir", help="the studio data dir (default: the usual one)")
    p.add_argument("--json", help="also write the results to this JSON file")
