"""The "did it learn?" verdicts on plain data (logged losses, generated texts), then one real
short run of the embedded model and one untrained (lora_B = 0) adapter on the same prompts.

The plain-data figures are the ones seen on this project's machines (issue 15): the default
click-through's loss 2.496 -> 2.541, the lr 2e-3 run's eval loss 2.45 -> 1.53, answers that
begin with the sample's JSON object vs a generic apology.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.train import checks

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "studio" / "data" / "sample_data" / "support_tickets.jsonl"


def sample_references() -> list[str]:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").split("\n") if line]
    return [r["messages"][-1]["content"] for r in rows]


def sample(base: str, tuned: str, ref: str, base_stop=True, tuned_stop=True, fits=True) -> dict:
    return {
        "prompt": "My parcel is late.",
        "reference": ref,
        "fits": fits,
        "base": base,
        "base_stopped": base_stop,
        "tuned": tuned,
        "tuned_stopped": tuned_stop,
    }


REF = '{"category": "shipping", "priority": "medium", "answer": "We are checking it."}'
APOLOGY = "I'm sorry to hear that your parcel is late. Please contact the carrier."


# --- eval loss, train loss --------------------------------------------------------------------


def test_eval_loss_verdicts_follow_the_logged_evaluations() -> None:
    fell = checks.eval_loss_fell([(0, 2.45), (10, 1.9), (21, 1.53)])
    assert fell["verdict"] == "green" and fell["ok"] is True
    assert "2.450 (step 0) -> 1.530 (step 21)" in fell["detail"]

    rose = checks.eval_loss_fell([(0, 2.496), (21, 2.541)])
    assert rose["verdict"] == "red" and rose["ok"] is False
    assert "learning rate" in rose["fix"] and "steps" in rose["fix"]

    barely = checks.eval_loss_fell([(0, 2.50), (21, 2.49)])
    assert barely["verdict"] == "amber" and barely["ok"] is None

    overfit = checks.eval_loss_fell([(0, 2.4), (10, 1.0), (20, 1.5)])
    assert overfit["verdict"] == "amber" and "step 10" in overfit["detail"]
    assert "fewer steps" in overfit["fix"]

    nan = checks.eval_loss_fell([(0, 2.4), (10, float("nan"))])
    assert nan["verdict"] == "red"
    assert checks.eval_loss_fell([(0, 2.4)])["verdict"] == "n/a"


def test_train_loss_that_did_not_fall_is_red_with_what_to_change() -> None:
    rose = checks.loss_fell([2.496, 2.51, 2.53, 2.541])
    assert rose["verdict"] == "red" and "learning rate" in rose["fix"]
    assert checks.loss_fell([4.3, 3.0, 2.0, 1.5])["verdict"] == "green"
    assert checks.loss_fell([4.3])["verdict"] == "n/a"


def test_did_it_learn_reads_eval_losses_from_the_log_step_0_included() -> None:
    entries = [
        {"kind": "eval", "step": 0, "eval_loss": 2.45},
        {"kind": "train", "step": 1, "loss": 2.6},
        {"kind": "train", "step": 2, "loss": 2.0},
        {"kind": "eval", "step": 2, "eval_loss": 1.9},
        {"kind": "train", "step": 3, "loss": 1.6},
    ]
    found = {c["name"]: c for c in checks.did_it_learn(entries, {}, _NoParams(), "cpu", "cpu")}
    assert "(step 0)" in found["eval loss went down"]["detail"]
    assert found["eval loss went down"]["verdict"] == "green"
    assert found["adapter weights moved"]["verdict"] == "red"  # no adapter tensors at all


class _NoParams:
    def named_parameters(self):
        return iter(())


# --- answers: format, stops, differ ------------------------------------------------------------


def test_the_samples_answers_share_the_json_format_and_a_fixed_prefix_is_found() -> None:
    fmt = checks.answer_format(sample_references())
    assert fmt is not None and fmt["kind"] == "json"
    prefix = checks.answer_format(["Answer: yes, today.", "Answer: no.", "Answer: maybe later"])
    assert prefix is not None and prefix["kind"] == "prefix" and prefix["prefix"] == "Answer: "
    assert checks.answer_format(["Sure, here it is.", "No idea.", "Try again later."]) is None
    assert checks.answer_format(["Answering now.", "Answer: no."]) is None  # "Answer" cut back


def test_an_answer_cut_off_by_the_limit_counts_when_it_begins_with_the_object() -> None:
    fmt = checks.answer_format(sample_references())
    cut = '{"category": "shipping", "priority": "medium", "answer": "We are che'
    assert checks.in_format(cut, REF, fmt, cut_off=True)
    assert not checks.in_format(cut, REF, fmt, cut_off=False)  # it stopped: must parse
    assert checks.in_format(REF, REF, fmt)
    assert not checks.in_format('{"answer": "x"}', REF, fmt)  # keys missing
    assert not checks.in_format(APOLOGY, REF, fmt, cut_off=True)


def test_format_learned_compares_base_and_fine_tune() -> None:
    fmt = checks.answer_format(sample_references())
    learned = [sample(APOLOGY, REF, REF) for _ in range(4)]
    check = checks.format_check(learned, fmt)
    assert check["verdict"] == "green" and "fine-tune 100%, base 0% of 4" in check["detail"]
    half = [sample(APOLOGY, REF, REF), sample(APOLOGY, APOLOGY, REF)]
    assert checks.format_check(half, fmt)["verdict"] == "amber"
    none = [sample(APOLOGY, APOLOGY, REF) for _ in range(4)]
    red = checks.format_check(none, fmt)
    assert red["verdict"] == "red" and "learning rate" in red["fix"]
    assert checks.format_check(none, None)["verdict"] == "n/a"


def test_it_stops_counts_answers_that_end_before_the_limit() -> None:
    ok = [sample(APOLOGY, REF, REF) for _ in range(3)]
    assert checks.stops_check(ok, 96, "<|im_end|>")["verdict"] == "green"
    runs_on = [sample(APOLOGY, REF, REF, tuned_stop=False) for _ in range(3)]
    red = checks.stops_check(runs_on, 96, "<|im_end|>")
    assert red["verdict"] == "red" and red["ok"] is False
    assert "masking" in red["fix"] and "0 of 3" in red["detail"]
    # A reference longer than the limit does not count against the model.
    long_ref = [*ok, sample(APOLOGY, REF, REF, tuned_stop=False, fits=False)]
    assert checks.stops_check(long_ref, 96, None)["verdict"] == "green"
    assert checks.stops_check([], 96, None)["verdict"] == "n/a"


def test_identical_answers_are_red_and_one_pair_is_shown() -> None:
    same = [sample(APOLOGY, APOLOGY, REF), sample("Hello.", " Hello. ", REF)]
    red = checks.differ_check(same)
    assert red["verdict"] == "red" and red["ok"] is False and "0 of 2" in red["detail"]
    assert red["example"]["base"] == APOLOGY and "learning rate" in red["fix"]
    changed = [sample(APOLOGY, REF, REF), sample("Hello.", "Hello.", REF)]
    green = checks.differ_check(changed)
    assert green["verdict"] == "green" and green["example"]["tuned"] == REF
    assert checks.differ_check([sample(None, REF, REF)])["verdict"] == "n/a"


def test_figures_go_to_the_metadata_and_the_model_card() -> None:
    fmt = checks.answer_format(sample_references())
    samples = [sample(APOLOGY, APOLOGY, REF, tuned_stop=False) for _ in range(3)]
    summary = checks.summarize_answers(samples, fmt, 96, "<|im_end|>")
    names = [c["name"] for c in summary["checks"]]
    assert names == ["it stops", "format learned", "base vs fine-tune differ"]
    figures = summary["figures"]
    assert figures["format"] == {"kind": "json", "base_rate": 0.0, "tuned_rate": 0.0}
    assert figures["it stops"]["verdict"] == "red" and figures["example"]["prompt"]
    meta = {"status": "completed", "checks": summary["checks"], "final_metrics": {}}
    card = checks.model_card(meta)
    assert "🔴 it stops" in card and "→ make sure the end-of-turn token" in card
    assert f"fine-tune: `{APOLOGY}`" in card
    # A run recorded before verdicts existed still renders.
    old = checks.model_card({"checks": [{"name": "loss went down", "ok": True, "detail": "x"}]})
    assert "🟢 loss went down: x" in old


def test_the_train_tab_shows_each_verdict_with_what_to_change_and_the_pair() -> None:
    from studio.train.jobs import JobSnapshot
    from studio.ui.train_tab import result_markdown

    same = [sample(APOLOGY, APOLOGY, REF) for _ in range(3)]
    found = checks.summarize_answers(same, checks.answer_format([REF]), 96, "<|im_end|>")
    snap = JobSnapshot(state="completed", message="Completed 21 steps.", checks=found["checks"])
    text = result_markdown(snap)
    assert "🟢 it stops" in text and "🔴 base vs fine-tune differ: 0 of 3" in text
    assert "→ raise the learning rate" in text and f"base: `{APOLOGY}`" in text


# --- real model -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def json_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 short support rows whose answers share one JSON object (quick to learn)."""
    path = tmp_path_factory.mktemp("checks-data") / "tickets.jsonl"
    kinds = [("charged twice for order", "billing"), ("package is late, order", "shipping")]
    with path.open("w", encoding="utf-8") as fh:
        for i in range(24):
            text, category = kinds[i % 2]
            reply = json.dumps({"category": category, "priority": "high"})
            row = {
                "messages": [
                    {"role": "user", "content": f"I was told my {text} {100 + i}."},
                    {"role": "assistant", "content": reply},
                ]
            }
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.mark.slow
def test_a_real_run_reports_every_check_and_an_untrained_adapter_is_red(
    embedded_model, json_rows: Path, tokenizer
) -> None:
    from peft import LoraConfig, get_peft_model

    from studio import runs
    from studio.config import RunConfig
    from studio.models.loader import load_model_for_inference
    from studio.train.jobs import execute_run
    from studio.train.prepare import prepare_run

    cfg = RunConfig(
        run_name="checks", dataset_path=str(json_rows), max_seq_len=128, batch_size=4,
        learning_rate=3e-3, warmup_ratio=0.0, lora_dropout=0.0, target_modules="attention",
        max_steps=4, eval_steps=2, val_fraction=0.25, allow_pii=True, seed=0,
    )  # fmt: skip
    prepared = prepare_run(cfg)
    result = execute_run(prepared)
    assert result.status == "completed", result.message
    found = {c["name"]: c for c in result.checks}
    assert set(found) >= {
        "adapter weights moved", "loss went down", "eval loss went down", "intended device",
        "it stops", "format learned", "base vs fine-tune differ",
    }  # fmt: skip
    assert all(c["verdict"] in checks.VERDICTS for c in result.checks)
    evals = [e["eval_loss"] for e in runs.load_log(result.run_dir) if e.get("kind") == "eval"]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals  # 4 steps at lr 3e-3 do teach it
    assert found["eval loss went down"]["verdict"] in ("green", "amber")
    assert found["adapter weights moved"]["verdict"] == "green"
    assert found["format learned"]["verdict"] != "n/a"  # every answer is a JSON object
    meta = runs.read_metadata(result.run_dir)
    assert meta["did_it_learn"]["prompts_from"] == "validation"
    assert meta["did_it_learn"]["format"]["kind"] == "json"
    assert "eval loss went down" in (result.run_dir / "README.md").read_text(encoding="utf-8")

    # The same prompts through an adapter that never trained (lora_B = 0): nothing differs.
    model = load_model_for_inference(embedded_model.path)
    untrained = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    start = {n: p.detach().float().clone() for n, p in untrained.named_parameters() if "lora" in n}
    found = checks.answer_checks(untrained, tokenizer, prepared.val_rows, prepared.train_rows)
    by_name = {c["name"]: c for c in found["checks"]}
    assert by_name["base vs fine-tune differ"]["verdict"] == "red"
    assert by_name["base vs fine-tune differ"]["ok"] is False
    assert checks.weights_moved(start, untrained)["verdict"] == "red"
    assert len(prepared.val_rows) == 6  # 25% of 24 rows: more than the checks sample
    assert found["figures"]["prompts"] == 4  # a few prompts keep the checks quick
