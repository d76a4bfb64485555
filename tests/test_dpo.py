"""DPO end to end on the real embedded model: blind votes -> preference pairs -> a DPO run that
continues from the voted run's adapter, through the same loader, PII gate and pipeline as SFT.

The default DPO click-through (bundled preference sample, CPU preset) is in
tests/test_dpo_ui.py, in Chromium.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio import runs
from studio.chat import evaluate
from studio.config import RunConfig
from studio.data.load import load_dataset_file
from studio.train.jobs import run_training

pytestmark = pytest.mark.slow

VOTES = [  # (winner shown as, tuned answer, base answer); A is the tuned side in every round
    ("A", '{"category": "billing", "priority": "low", "answer": "Refunds take 3 days."}',
     "Thank you so much for reaching out! Refunds take 3 days."),
    ("B", "Category: shipping. Priority: low. It ships tomorrow.",
     '{"category": "shipping", "priority": "low", "answer": "It ships tomorrow."}'),
    ("tie", '{"category": "account"}', "Account question."),
    ("A", '{"category": "returns", "priority": "medium", "answer": "Use My Orders."}',
     "Sure! Use My Orders. Have a wonderful day!"),
    ("A", "same text", "same text"),  # nothing to prefer: left out
]  # fmt: skip
PROMPTS = ["Where is my refund?", "When does it ship?", "My account?", "How to return?", "Hi"]


def fresh_adapter_run(embedded_model, root: Path) -> Path:
    """A run folder holding a real LoRA adapter of the embedded model (what an SFT run
    leaves; its weights do not matter here, its shape and loading do)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run_dir = root / "sft-run"
    model = AutoModelForCausalLM.from_pretrained(str(embedded_model.path))
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(str(run_dir / runs.ADAPTER))
    runs.write_metadata(run_dir, {"run_name": "sft-run", "objective": "sft", "status": "completed"})
    return run_dir


def test_votes_become_pairs_and_train_a_dpo_run(embedded_model, tmp_path: Path) -> None:
    run_dir = fresh_adapter_run(embedded_model, tmp_path)
    for (vote, tuned, base), prompt in zip(VOTES, PROMPTS, strict=True):
        answers = {"tuned": tuned, "base": base}
        evaluate.record_blind_vote(
            run_dir, vote, {"A": "tuned", "B": "base"}, prompt=prompt, answers=answers
        )

    made = evaluate.votes_to_pairs(run_dir, "sft-run")
    assert (made.pairs, made.ties, made.skipped) == (3, 1, 1)
    rows = [json.loads(line) for line in made.path.read_text(encoding="utf-8").splitlines()]
    assert rows[0]["chosen"] == VOTES[0][1] and rows[0]["rejected"] == VOTES[0][2]
    assert rows[1]["chosen"] == VOTES[1][2]  # B (the base) won: its answer is chosen
    assert rows[0]["meta"]["origin"] == "blind votes" and rows[0]["meta"]["winner"] == "tuned"
    report = load_dataset_file(made.path)  # the same loader and checks as any dataset
    assert report.format == "preference" and report.valid == 3 and not report.errors
    again = evaluate.votes_to_pairs(run_dir)  # a second export never replaces the first
    assert again.path != made.path and made.path.is_file()

    cfg = RunConfig(
        run_name="dpo-votes",
        objective="dpo",
        dataset_path=str(made.path),
        init_adapter=str(run_dir),
        lora_r=8,
        lora_alpha=16,
        batch_size=2,
        max_steps=2,
        val_fraction=0.34,  # one pair held out: the before/after figures are measured
        device="cpu",
    )
    result = run_training(cfg)
    assert result.status == "completed", (result.message, result.advice)
    meta = runs.read_metadata(result.run_dir)
    assert meta["objective"] == "dpo"
    assert meta["starts_from"]["kind"] == "run"
    assert meta["starts_from"]["run_dir"] == str(run_dir.resolve())
    figures = meta["did_it_learn"]["preference"]
    assert figures["pairs"] == 1 and figures["eval_loss"] > 0
    names = {c["name"] for c in meta["checks"]}
    assert {"reward accuracy rose", "prefers the chosen answer", "adapter weights moved"} <= names
    saved = json.loads((result.run_dir / runs.ADAPTER / "adapter_config.json").read_text("utf-8"))
    assert saved["r"] == 4  # the SFT run's adapter trained on, not a fresh one of cfg's r 8
