"""After a run: "did it learn?", the final figures, and the run folder's model card.

The loop calls these once training ends; they read the run's log entries and the trained
model, and return plain data that the CLI prints, the Train tab shows and README.md records.

Each check is a dict: `name`, `verdict` (green / amber / red, or n/a where it does not apply),
`ok` (True for green, False for red, None otherwise: what older readers of a run look at),
`detail` (the figures, in words) and `fix` (what to change when it is not green: learning rate,
steps, targets or masking). The verdicts are plain functions of plain data (logged losses,
generated texts), so they are tested without a model; `answer_checks` is the one part that
generates, on the already-loaded training model, base (adapter disabled) vs fine-tune.
"""

from __future__ import annotations

import math
import re
from typing import Any

Check = dict[str, Any]
VERDICTS = ("green", "amber", "red", "n/a")

# Sample answers: few prompts, greedy, short, so the checks add seconds, not minutes, on a CPU.
SAMPLE_PROMPTS = 4
SAMPLE_TOKENS = 96  # the length limit, raised (up to MAX_SAMPLE_TOKENS) for longer answers
MAX_SAMPLE_TOKENS = 256
FORMAT_SHARE = 0.9  # this share of the dataset's answers in one format makes it "the format"
FORMAT_GOAL = 0.8  # the fine-tune answers in that format at least this often: green
EVAL_DROP = 0.03  # eval loss fell by at least 3%: green
EXAMPLE_CHARS = 300

FIX_LEARN = (
    "raise the learning rate (e.g. 1e-3 for a model under 1B, 2e-4 for 7B), train more steps,"
    " or target all linear layers"
)
FIX_MASK = (
    "make sure the end-of-turn token carries loss (masking: a collator that masks the pad"
    " token also masks EOS when pad == eos), and train more steps"
)


def make_check(name: str, verdict: str, detail: str, fix: str = "", **extra: Any) -> Check:
    """One check as plain data; `ok` mirrors the verdict for readers that only know ok."""
    assert verdict in VERDICTS, verdict
    ok = {"green": True, "red": False}.get(verdict)
    return {"name": name, "verdict": verdict, "ok": ok, "detail": detail, "fix": fix, **extra}


def verdict_of(check: Check) -> str:
    """A check's verdict; checks recorded before verdicts existed have only `ok`."""
    if check.get("verdict") in VERDICTS:
        return check["verdict"]
    return {True: "green", False: "red"}.get(check.get("ok"), "n/a")


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
        "avg_tokens_per_s": last.get("avg_tokens_per_s"),  # the run's average: the Train tab's
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
) -> list[Check]:
    """The checks read off the log and the weights: weights moved, loss fell, eval loss fell,
    the intended device. (`answer_checks` adds the ones that generate.)

    `init_params` are the trainable tensors at the start; `expected` is the device the
    settings meant ("cuda", "cpu" or "any", `studio.train.prepare.expected_device`).
    """
    losses = [e["loss"] for e in entries if e.get("kind") == "train"]
    evals = [(e.get("step", 0), e["eval_loss"]) for e in entries if e.get("kind") == "eval"]
    return [
        weights_moved(init_params, model),
        loss_fell(losses),
        eval_loss_fell(evals),
        intended_device(device, expected),
    ]


def weights_moved(init_params: dict[str, Any], model: Any) -> Check:
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
    detail = f"{moved} of {total} adapter tensors changed (max |Δ| {biggest:.2e})"
    if total > 0 and moved == total:
        return make_check("adapter weights moved", "green", detail)
    return make_check(
        "adapter weights moved",
        "red",
        detail,
        "some adapter tensors never changed: check that their gradients flow (learning rate"
        " above 0, targets that the forward pass uses)",
    )


def loss_fell(losses: list[float]) -> Check:
    """The mean of the last third of logged losses is below the mean of the first third."""
    if len(losses) < 2:
        return make_check("loss went down", "n/a", "too few logged steps to tell")
    k = max(1, len(losses) // 3)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    detail = f"train loss {first:.3f} (first {k} logs) -> {last:.3f} (last {k})"
    if not last < first:  # (a NaN loss did not fall either)
        return make_check("loss went down", "red", detail + ": it did not fall", FIX_LEARN)
    return make_check("loss went down", "green", detail)


def eval_loss_fell(evals: list[tuple[int, float]]) -> Check:
    """Validation loss from its first evaluation (step 0 when the run evaluates at the start)
    to its last: the held-out figure that says the run learned something that generalises."""
    name = "eval loss went down"
    if len(evals) < 2:
        detail = "fewer than two evaluations on the validation split"
        return make_check(name, "n/a", detail, "keep a validation split (val_fraction > 0)")
    (s0, start), (s1, end) = evals[0], evals[-1]
    best_step, best = min(evals, key=lambda e: e[1])
    detail = f"eval loss {start:.3f} (step {s0}) -> {end:.3f} (step {s1})"
    if not (math.isfinite(start) and math.isfinite(end)) or not end < start:
        fix = FIX_LEARN + "; if it rose while the train loss fell, lower the learning rate"
        return make_check(name, "red", detail + ": it did not fall", fix)
    drop = (start - end) / start if start > 0 else 0.0
    detail += f" ({drop:.0%} lower)"
    if end > best * 1.1 and best_step != s1:
        detail += f"; it was lowest ({best:.3f}) at step {best_step} and rose since"
        fix = "overfitting: train fewer steps or epochs, or lower the learning rate"
        return make_check(name, "amber", detail, fix)
    if drop < EVAL_DROP:
        return make_check(name, "amber", detail + ": it barely moved", FIX_LEARN)
    return make_check(name, "green", detail)


def intended_device(device: str, expected: str) -> Check:
    """Training ran where the settings meant it to; a GPU run that fell back to CPU warns."""
    name = "intended device"
    if expected == "cuda" and device != "cuda":
        detail = (
            "WARNING: a GPU was expected but training ran on the CPU"
            " (is the CUDA build of torch installed?)"
        )
        fix = "install the CUDA build of torch (python -m studio.doctor says how)"
        return make_check(name, "red", detail, fix)
    if expected in ("any", device):
        return make_check(
            name, "green", f"trained on {device}" + ("" if expected == "any" else " as intended")
        )
    return make_check(name, "green", f"trained on {device} (the settings suggested {expected})")


# --- preference runs (DPO): held-out pairs, before and after ------------------------------

REWARD_GOAL = 0.7  # the trained adapter ranks at least this share of held-out pairs right: green


def preference_checks(figures: dict[str, Any]) -> list[Check]:
    """ "Reward accuracy rose" and "prefers the chosen answer" on held-out pairs
    (`studio.train.dpo.preference_figures`), with their before and after figures.

    The reward accuracy starts at 0 (the adapter starts as the reference, every reward is 0),
    so the second check carries the real before/after: how often the model itself gives the
    chosen answer a higher probability than the rejected one."""
    if not figures:
        detail = "no held-out pairs (val_fraction 0)"
        fix = "keep a validation split (val_fraction > 0)"
        return [make_check("reward accuracy rose", "n/a", detail, fix)]
    n = figures["pairs"]
    acc, margin = figures["reward_accuracy"], figures["reward_margin"]
    detail = (
        f"DPO reward accuracy on {n} held-out pairs 0% -> {acc:.0%},"
        f" reward margin 0 -> {margin:.3f}"
    )
    if acc >= REWARD_GOAL and margin > 0:
        reward = make_check("reward accuracy rose", "green", detail)
    else:
        verdict = "amber" if acc > 0.5 and margin > 0 else "red"
        reward = make_check("reward accuracy rose", verdict, detail, FIX_PREFERENCE)
    before, after = figures["before_prefers_chosen"], figures["after_prefers_chosen"]
    detail = (
        f"prefers the chosen answer on {before:.0%} of held-out pairs before, {after:.0%} after"
        f" (log-prob margin {figures['before_logp_margin']:.1f} ->"
        f" {figures['after_logp_margin']:.1f})"
    )
    if after > before or (
        after == 1.0 and figures["after_logp_margin"] > figures["before_logp_margin"]
    ):
        prefers = make_check("prefers the chosen answer", "green", detail)
    else:
        prefers = make_check("prefers the chosen answer", "red", detail, FIX_PREFERENCE)
    return [reward, prefers]


FIX_PREFERENCE = (
    "raise the learning rate or train more steps; lower beta (e.g. 0.05) lets the adapter move"
    " further from the reference; check that chosen and rejected differ in what you want"
)


# --- answers: the format the dataset's answers share ---------------------------------------


def reference_of(row: dict[str, Any]) -> tuple[list[dict[str, str]], str] | None:
    """(prompt messages, expected answer) of a chat row that ends with an assistant reply."""
    messages = row.get("messages") or []
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        return None
    return [dict(m) for m in messages[:-1]], str(messages[-1].get("content") or "")


def answer_format(references: list[str]) -> dict[str, Any] | None:
    """The format the answers share, if any: JSON objects (FORMAT_SHARE of them parse as one)
    or a fixed prefix (every answer starts with the same few words); None otherwise."""
    from studio.data.scores import parse_json_object

    refs = [r for r in references if r.strip()]
    if not refs:
        return None
    objects = [parse_json_object(r) for r in refs]
    share = sum(o is not None for o in objects) / len(refs)
    if share >= FORMAT_SHARE:
        return {"kind": "json", "share": round(share, 3), "label": "a JSON object"}
    prefix = _word_prefix([r.strip() for r in refs])
    if len(prefix.strip()) >= 4:
        return {"kind": "prefix", "prefix": prefix, "share": 1.0, "label": f"'{prefix.strip()}'"}
    return None


def _word_prefix(texts: list[str]) -> str:
    """The longest prefix of all texts, cut back to a word or punctuation boundary."""
    from studio.data.chat_format import common_prefix

    prefix = common_prefix(texts)
    whole = any(t == prefix for t in texts)  # one text is the prefix: no word was cut
    if not whole and prefix and prefix[-1].isalnum():
        cut = max(prefix.rfind(c) for c in " :,.;-\n")
        prefix = prefix[: cut + 1] if cut >= 0 else ""
    return prefix


def in_format(text: str, reference: str, fmt: dict[str, Any], cut_off: bool = False) -> bool:
    """Whether an answer is in the dataset's format. For JSON, `json_format_ok` (an object with
    every key of the reference); an answer cut off by the length limit counts when it begins
    with that object (its first key), since the limit, not the model, ended it."""
    from studio.data.scores import json_format_ok, parse_json_object

    if fmt["kind"] == "prefix":
        return text.strip().startswith(fmt["prefix"].strip())
    if json_format_ok(text, reference):
        return True
    keys = list(parse_json_object(reference) or {})
    if not cut_off or not keys:
        return False
    return re.match(r'\s*(```(?:json)?\s*)?\{\s*"' + re.escape(keys[0]) + '"', text) is not None


# --- answers: verdicts on generated texts ---------------------------------------------------


def stops_check(samples: list[dict[str, Any]], limit: int, marker: str | None) -> Check:
    """The fine-tune ends its answers with the end-of-turn token before the length limit.
    Samples whose reference answer is longer than the limit do not count."""
    name = "it stops"
    counted = [s for s in samples if s.get("fits", True)]
    if not counted:
        return make_check(name, "n/a", f"no sample answer is shorter than {limit} tokens")
    n = len(counted)
    tuned = sum(bool(s["tuned_stopped"]) for s in counted)
    base = sum(bool(s["base_stopped"]) for s in counted if s.get("base_stopped") is not None)
    end = f"the end-of-turn token ({marker})" if marker else "the end-of-turn token"
    detail = f"{tuned} of {n} fine-tune answers ended with {end} within {limit} tokens"
    detail += f" (base: {base} of {n})"
    if tuned == n:
        return make_check(name, "green", detail)
    verdict = "amber" if tuned * 2 >= n else "red"
    return make_check(name, verdict, detail + ": it runs on", FIX_MASK)


def format_check(samples: list[dict[str, Any]], fmt: dict[str, Any] | None) -> Check:
    """The share of answers in the dataset's format, base vs fine-tune."""
    name = "format learned"
    if fmt is None:
        return make_check(name, "n/a", "the dataset's answers share no fixed format")
    n = len(samples)
    if not n:
        return make_check(name, "n/a", "no sample answers")
    base, tuned = format_rates(samples, fmt)
    detail = (
        f"answers in the dataset's format ({fmt['label']}): fine-tune {tuned:.0%},"
        f" base {base:.0%} of {n}"
    )
    if tuned >= FORMAT_GOAL:
        return make_check(name, "green", detail)
    verdict = "amber" if tuned > base else "red"
    return make_check(name, verdict, detail, FIX_LEARN)


def format_rates(samples: list[dict[str, Any]], fmt: dict[str, Any]) -> tuple[float, float]:
    """(base, fine-tune) share of samples in the format; 0.0 for a side not generated."""
    rates = []
    for side in ("base", "tuned"):
        hits = [
            in_format(s[side], s["reference"], fmt, cut_off=not s[f"{side}_stopped"])
            for s in samples
            if s.get(side) is not None
        ]
        rates.append(sum(hits) / len(hits) if hits else 0.0)
    return rates[0], rates[1]


def differ_check(samples: list[dict[str, Any]]) -> Check:
    """Base and fine-tune answer differently (greedy, same prompts); one pair is shown."""
    from studio.data.scores import normalize_text

    name = "base vs fine-tune differ"
    pairs = [s for s in samples if s.get("base") is not None]
    if not pairs:
        return make_check(name, "n/a", "the base side could not be generated")
    differ = [s for s in pairs if normalize_text(s["base"]) != normalize_text(s["tuned"])]
    shown = (differ or pairs)[0]
    example = {k: _clip(shown[k]) for k in ("prompt", "base", "tuned")}
    detail = f"{len(differ)} of {len(pairs)} answers differ from the base model's"
    if len(differ) * 2 >= len(pairs):
        return make_check(name, "green", detail, example=example)
    verdict = "amber" if differ else "red"
    detail += "" if differ else ": the adapter changed nothing visible"
    return make_check(name, verdict, detail, FIX_LEARN, example=example)


def _clip(text: str) -> str:
    text = text or ""
    return text if len(text) <= EXAMPLE_CHARS else text[: EXAMPLE_CHARS - 1] + "…"


def summarize_answers(
    samples: list[dict[str, Any]],
    fmt: dict[str, Any] | None,
    limit: int,
    marker: str | None,
    source: str = "validation",
) -> dict[str, Any]:
    """The answer checks and their figures (for the metadata) from generated samples."""
    found = [stops_check(samples, limit, marker), format_check(samples, fmt), differ_check(samples)]
    figures: dict[str, Any] = {"prompts": len(samples), "prompts_from": source, "limit": limit}
    for check in found:
        figures[check["name"]] = {"verdict": check["verdict"], "detail": check["detail"]}
    if fmt is not None and samples:
        base, tuned = format_rates(samples, fmt)
        figures["format"] = {"kind": fmt["kind"], "base_rate": base, "tuned_rate": tuned}
    figures["example"] = found[2].get("example")
    return {"checks": found, "figures": figures}


# --- answers: generating them on the trained model ------------------------------------------


def pick_samples(
    tok: Any, rows: list[dict[str, Any]], n: int = SAMPLE_PROMPTS, limit: int = SAMPLE_TOKENS
) -> tuple[list[dict[str, Any]], int]:
    """Up to n (prompt, reference) rows, those whose answer fits well under `limit` first (in
    split order), and a length limit raised to 1.5x the longest chosen answer (capped)."""
    items = []
    for row in rows:
        ref = reference_of(row)
        if ref is not None:
            tokens = len(tok(ref[1], add_special_tokens=False)["input_ids"])
            items.append({"messages": ref[0], "reference": ref[1], "ref_tokens": tokens})
    short = [it for it in items if it["ref_tokens"] * 3 <= limit * 2]
    rest = sorted((it for it in items if it not in short), key=lambda it: it["ref_tokens"])
    chosen = (short + rest)[:n]
    longest = max((it["ref_tokens"] for it in chosen), default=0)
    limit = min(MAX_SAMPLE_TOKENS, max(limit, math.ceil(longest * 1.5)))
    for it in chosen:
        it["fits"] = it["ref_tokens"] < limit
    return chosen, limit


def sample_answers(
    model: Any, tok: Any, items: list[dict[str, Any]], limit: int, base: bool = True
) -> list[dict[str, Any]]:
    """Base (adapter disabled) and fine-tune answers to each item's prompt, greedy, batched.

    Runs on the training model as it is (no second copy in memory); `model.eval()` first, so
    dropout is off and the answers are the ones Chat will give. The two sides are two
    `generate` calls on batches of the very same shape, not Chat's one mixed batch
    (`studio.models.batching.adapter_rows`): in bf16 a row's position in a batch changes its
    rounding, and "base vs fine-tune differ" must not count rounding as the adapter's doing
    (an adapter that changed nothing gives the same answers here, to the bit).
    """
    import contextlib

    from studio.data.chat_format import render
    from studio.models.generate import greedy_texts

    model.eval()
    prompts = [render(tok, it["messages"], add_generation_prompt=True) for it in items]
    tuned = greedy_texts(model, tok, prompts, limit)
    plain: list[tuple[str | None, bool | None]] = [(None, None)] * len(items)
    if base and hasattr(model, "disable_adapter"):
        with model.disable_adapter() or contextlib.nullcontext():
            plain = list(greedy_texts(model, tok, prompts, limit))
    samples = []
    for it, (t_text, t_stop), (b_text, b_stop) in zip(items, tuned, plain, strict=True):
        users = [m["content"] for m in it["messages"] if m.get("role") == "user"]
        samples.append(
            {
                "prompt": users[-1] if users else "",
                "reference": it["reference"],
                "fits": it.get("fits", True),
                "tuned": t_text,
                "tuned_stopped": t_stop,
                "base": b_text,
                "base_stopped": b_stop,
            }
        )
    return samples


def answer_checks(
    model: Any,
    tok: Any,
    val_rows: list[dict[str, Any]],
    train_rows: list[dict[str, Any]],
    n_prompts: int = SAMPLE_PROMPTS,
    *,
    limit: int = SAMPLE_TOKENS,  # answers that fit it are picked first (pick_samples)
) -> dict[str, Any]:
    """The checks "it stops", "format learned" and "base vs fine-tune differ" on a few validation
    prompts (training prompts when the run held none out), with their figures.

    Never raises: the adapter is already saved, so a failure here is reported as a check.
    """
    from studio.data.chat_format import end_of_turn_token

    source = "validation" if any(reference_of(r) for r in val_rows) else "training"
    try:
        rows = val_rows if source == "validation" else train_rows
        items, limit = pick_samples(tok, rows, n_prompts, limit)
        if not items:
            detail = "no conversation ends with an assistant answer to compare against"
            return {"checks": [make_check("sample answers", "n/a", detail)], "figures": {}}
        refs = [ref[1] for r in [*train_rows, *val_rows] if (ref := reference_of(r))]
        samples = sample_answers(model, tok, items, limit)
        return summarize_answers(
            samples, answer_format(refs), limit, end_of_turn_token(tok), source
        )
    except Exception as exc:  # a check that cannot run must not fail a trained run
        detail = f"could not generate sample answers: {type(exc).__name__}: {exc}"[:400]
        fix = "open the run in Chat to compare base and fine-tune by hand"
        return {"checks": [make_check("sample answers", "amber", detail, fix)], "figures": {}}


# --- the model card ---------------------------------------------------------------------------

MARKS = {"green": "🟢", "amber": "🟡", "red": "🔴", "n/a": "•"}


def check_lines(found: list[Check]) -> list[str]:
    """Markdown bullets of checks: the verdict mark, the figures, what to change, the example
    pair (shared by the model card and the Train tab)."""
    lines = []
    for c in found:
        verdict = verdict_of(c)
        line = f"- {MARKS[verdict]} {c['name']}: {c['detail']}"
        if c.get("fix") and verdict in ("amber", "red"):
            line += f"  \n  → {c['fix']}"
        lines.append(line)
        if c.get("example"):
            ex = c["example"]
            lines.append(f"  - prompt: {_one_line(ex['prompt'])}")
            lines.append(f"  - base: {_one_line(ex['base'])}")
            lines.append(f"  - fine-tune: {_one_line(ex['tuned'])}")
    return lines


def _one_line(text: str) -> str:
    return "`" + " ".join(str(text).split()).replace("`", "'") + "`"


def model_card(meta: dict[str, Any]) -> str:
    """A README.md for the run folder: what was trained, on what, how well, how to load it."""
    s, base, data = meta.get("settings", {}), meta.get("base_model", {}), meta.get("dataset", {})
    fm, versions = meta.get("final_metrics") or {}, meta.get("versions") or {}
    checks = "\n".join(check_lines(meta.get("checks") or []))
    rows = "\n".join(f"| {k} | {v} |" for k, v in s.items())
    return f"""# {meta.get("run_name", "run")}: LoRA adapter for {base.get("name", "?")}

Status: **{meta.get("status")}** · trained with LoRA Studio {versions.get("lora-studio", "")}

- Base model: `{base.get("name")}` ({base.get("source", "?")}, revision `{base.get("revision")}`)
- Method: {s.get("method")} · rank {s.get("lora_r")} · targets {s.get("target_modules")}
- Dataset: `{data.get("path")}` (sha256 `{str(data.get("sha256", ""))[:16]}`), \
{data.get("train_rows")} train / {data.get("val_rows")} validation rows
- Final train loss: {fm.get("train_loss")} · eval loss: {fm.get("first_eval_loss")} -> \
{fm.get("eval_loss")} · steps: {fm.get("step")}
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
