"""Preference data (DPO) and its settings, without training: the row checks, the PII scan of
both answers, the template check, the bundled sample, `method: dpo`, the DPO checks' verdicts.

Training on the pairs is in tests/test_dpo.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.config import ConfigError, RunConfig
from studio.data import pii
from studio.data.load import SAMPLE_PREFERENCES, load_dataset_file, training_row
from studio.train import checks


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


GOOD = {"prompt": "Hi?", "chosen": '{"a": 1}', "rejected": "Hello there!"}


def test_preference_rows_are_checked_row_by_row(tmp_path: Path) -> None:
    """Each bad row is reported with its line and field and left out; good rows stay."""
    rows = [
        GOOD,  # 1: strings
        {"prompt": "Hi?", "chosen": "same", "rejected": " same "},  # 2: nothing to prefer
        {"prompt": "Hi?", "chosen": "", "rejected": "x"},  # 3: empty chosen
        {"prompt": "Hi?", "chosen": "a"},  # 4: no rejected (a messages-free row)
        {  # 5: conversational, a system turn in the prompt
            "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
            "chosen": [{"role": "assistant", "content": "A"}],
            "rejected": [{"role": "assistant", "content": "B"}],
        },
        {  # 6: an answer that is not the assistant's
            "prompt": "Q",
            "chosen": [{"role": "user", "content": "A"}],
            "rejected": "B",
        },
        {  # 7: implicit prompt: whole conversations sharing the user turn
            "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}],
        },
        {  # 8: a prompt that ends with the assistant
            "prompt": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
            "chosen": "C",
            "rejected": "D",
        },
        {**GOOD, "extra": 1},  # 9: unknown key
    ]
    report = load_dataset_file(write_jsonl(tmp_path / "p.jsonl", rows))
    assert report.format == "preference"
    assert report.row_numbers == [1, 5, 7]
    errors = {(e.line, e.field) for e in report.errors}
    assert errors == {
        (2, "rejected"),
        (3, "chosen"),
        (4, "rejected"),
        (6, "chosen"),
        (8, "prompt"),
        (9, "extra"),
    }
    same = next(e for e in report.errors if e.line == 2)
    assert "nothing to prefer" in same.message
    implicit = report.rows[2]
    assert implicit["prompt"] == [{"role": "user", "content": "Q"}]
    assert implicit["chosen"] == [{"role": "assistant", "content": "A"}]
    assert report.rows[0]["messages"] == [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": '{"a": 1}'},
    ]
    assert report.summary()["preference"]["pairs"] == 3


def test_pii_scan_reads_both_answers_and_redaction_keeps_the_format(tmp_path: Path) -> None:
    """A phone number in the rejected answer is found; the redacted copy is a preference file."""
    rows = [GOOD, {"prompt": "Call me?", "chosen": "No.", "rejected": "Call +84 912 345 678"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    report = load_dataset_file(path)
    scan = pii.scan_rows(report.rows, report.row_numbers)
    assert [(f.row, f.where) for f in scan.findings] == [(2, "rejected[0].content")]
    cleaned = pii.write_cleaned(report.rows, path, "redact")
    again = load_dataset_file(cleaned.path)
    assert again.format == "preference" and again.valid == 2
    assert "[PHONE]" in again.rows[1]["rejected"][0]["content"]
    assert pii.unresolved_pii(cleaned.path) == 0


def test_template_check_renders_chosen_and_rejected(tmp_path: Path, tokenizer) -> None:
    """With the model's tokenizer, a pair is left out when the template rejects the rejected
    side's conversation, not only the chosen one's."""
    strict = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    strict.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]"
        "['role'] %}{{ raise_exception('roles must alternate') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    two_turns = [{"role": "assistant", "content": "B1"}, {"role": "assistant", "content": "B2"}]
    rows = [GOOD, {"prompt": "Q", "chosen": "A", "rejected": two_turns}]
    report = load_dataset_file(write_jsonl(tmp_path / "p.jsonl", rows), tokenizer=strict)
    assert report.row_numbers == [1]
    assert report.errors[0].line == 2 and "alternate" in report.errors[0].message


def test_bundled_preference_sample_is_clean_and_checkable() -> None:
    """The sample loads whole, has no PII, and its chosen answers are JSON, rejected not."""
    report = load_dataset_file(SAMPLE_PREFERENCES, json_check=True)
    assert report.format == "preference" and report.invalid == 0 and report.valid == 60
    assert not pii.scan_rows(report.rows, report.row_numbers).findings
    assert report.json_check["failed"] == 0  # chosen (messages' reply) all parse
    rejected_json = 0
    for row in report.rows:
        try:
            json.loads(row["rejected"][0]["content"])
            rejected_json += 1
        except ValueError:
            pass
    assert rejected_json == 0
    assert set(training_row(report.rows[0])) == {"messages", "prompt", "chosen", "rejected"}


def test_config_objective_and_method_shorthand(tmp_path: Path) -> None:
    """`method: dpo` means DPO on LoRA; QLoRA + DPO is two fields; bad values name the field."""
    cfg = RunConfig.from_dict({"method": "dpo"})
    assert (cfg.method, cfg.objective) == ("lora", "dpo")
    cfg = RunConfig.from_dict({"method": "qlora", "objective": "dpo", "dpo_beta": "0.2"})
    assert (cfg.method, cfg.objective, cfg.dpo_beta) == ("qlora", "dpo", 0.2)
    assert RunConfig().objective == "sft"
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"method": "dpo", "objective": "sft"})
    assert err.value.field == "method"
    for bad in ({"objective": "ppo"}, {"dpo_beta": 0}, {"init_adapter": str(tmp_path)}):
        with pytest.raises(ConfigError) as err:
            RunConfig(**bad).validate()
        assert err.value.field == next(iter(bad))


def test_dpo_refuses_sft_rows_before_any_model_loads(tmp_path: Path, sample_dataset_path) -> None:
    """DPO on chat rows is refused at Start with the field and what to do."""
    from studio.train.prepare import dataset_file, read_dataset

    cfg = RunConfig(objective="dpo", dataset_path=str(sample_dataset_path))
    with pytest.raises(ConfigError) as err:
        read_dataset(cfg)
    assert err.value.field == "objective" and "preference" in str(err.value)
    assert dataset_file(RunConfig(objective="dpo")) == SAMPLE_PREFERENCES


def test_preference_check_verdicts() -> None:
    """Green when the trained adapter ranks most held-out pairs right and prefers chosen more."""
    learned = {
        "pairs": 10,
        "reward_accuracy": 0.9,
        "reward_margin": 0.8,
        "before_prefers_chosen": 0.4,
        "after_prefers_chosen": 0.9,
        "before_logp_margin": -2.0,
        "after_logp_margin": 6.0,
    }
    assert [c["verdict"] for c in checks.preference_checks(learned)] == ["green", "green"]
    nothing = {**learned, "reward_accuracy": 0.3, "reward_margin": -0.1}
    nothing["after_prefers_chosen"] = 0.4
    assert [c["verdict"] for c in checks.preference_checks(nothing)] == ["red", "red"]
    assert checks.preference_checks({})[0]["verdict"] == "n/a"


def test_chat_pairs_button_fills_dataset_and_train(tmp_path: Path) -> None:
    """The Chat tab's handler: votes of the loaded run -> a new dataset, objective DPO,
    continuing from that run's adapter; without votes only the message changes."""
    from studio.chat import evaluate
    from studio.ui.chat.blind import PAIR_TARGETS, make_pairs

    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    mine = {"has_adapter": True, "out_dir": str(run_dir), "label": "run"}
    message, *rest = make_pairs(mine, list(PAIR_TARGETS))
    assert "no blind votes" in message and len(rest) == len(PAIR_TARGETS)
    answers = {"tuned": '{"a": 1}', "base": "Sure! a is 1."}
    evaluate.record_blind_vote(
        run_dir, "A", {"A": "tuned", "B": "base"}, prompt="a?", answers=answers
    )
    message, path, fmt, pii_count, objective, start = make_pairs(mine, list(PAIR_TARGETS))
    assert "1** preference pairs" in message
    assert (fmt, pii_count, objective, start) == ("preference", 0, "dpo", str(run_dir))
    assert load_dataset_file(path).rows[0]["chosen"][0]["content"] == '{"a": 1}'


def test_vram_estimate_knows_dpo_shape() -> None:
    """DPO: chosen and rejected in one batch (batch_size // 2 pairs, at least one) plus a
    no-grad reference forward; SFT's estimate is unchanged."""
    from studio.hardware import vram

    shape = vram.model_shape("HuggingFaceTB/SmolLM2-135M-Instruct")
    sft = vram.estimate(shape, RunConfig(batch_size=4))
    dpo = vram.estimate(shape, RunConfig(batch_size=4, objective="dpo"))
    assert "reference" not in [p.key for p in sft.parts]
    assert dpo.part("reference") > 0
    assert dpo.part("activations") == sft.part("activations")  # 2 pairs = 4 sequences
    assert dpo.total_bytes == sft.total_bytes + dpo.part("reference")
    one = vram.estimate(shape, RunConfig(batch_size=1, objective="dpo"))
    assert one.tokens_per_step == 2 * RunConfig().max_seq_len  # one pair is two sequences
