"""After a run: "did it learn?", the final figures, and the run folder's model card.

The loop calls these once training ends; they read the run's log entries and the trained
model, and return plain data that the CLI prints, the Train tab shows and README.md records.
"""

from __future__ import annotations

from typing import Any


def final_metrics(entries: list[dict[str, Any]], step: int | None) -> dict[str, Any]:
    """The last logged figures of a run (and its first losses, to compare against)."""
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
    entries: list[dict[str, Any]],
    init_params: dict[str, Any],
    model: Any,
    device: str,
    expected: str,
) -> list[dict[str, Any]]:
    """Three checks shown with the result: weights moved, loss fell, the intended device.

    `init_params` are the trainable tensors at the start; `expected` is the device the
    settings meant ("cuda", "cpu" or "any", `studio.train.prepare.expected_device`).
    """
    losses = [e["loss"] for e in entries if e.get("kind") == "train"]
    return [
        weights_moved(init_params, model),
        loss_fell(losses),
        intended_device(device, expected),
    ]


def weights_moved(init_params: dict[str, Any], model: Any) -> dict[str, Any]:
    """Every adapter tensor changed from its start (a LoRA run that trained moves them all)."""
    moved, total, biggest = 0, 0, 0.0
    for name, param in model.named_parameters():
        start = init_params.get(name)
        if start is None:
            continue
        total += 1
        delta = (param.detach().float().cpu() - start).abs().max().item()
        biggest = max(biggest, delta)
        moved += delta > 0
    return {
        "name": "adapter weights moved",
        "ok": total > 0 and moved == total,
        "detail": f"{moved} of {total} adapter tensors changed (max |Δ| {biggest:.2e})",
    }


def loss_fell(losses: list[float]) -> dict[str, Any]:
    """The mean of the last third of logged losses is below the mean of the first third."""
    if len(losses) < 2:
        return {"name": "loss went down", "ok": None, "detail": "too few logged steps to tell"}
    k = max(1, len(losses) // 3)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    detail = f"train loss {first:.3f} (first {k} logs) -> {last:.3f} (last {k})"
    if not last < first:  # (a NaN loss did not fall either)
        detail += ": it did not fall; try a higher learning rate or more steps"
    return {"name": "loss went down", "ok": last < first, "detail": detail}


def intended_device(device: str, expected: str) -> dict[str, Any]:
    """Training ran where the settings meant it to; a GPU run that fell back to CPU warns."""
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
    return {"name": "intended device", "ok": ok, "detail": detail}


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
