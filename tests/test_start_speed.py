"""Start -> first step: the step-0 eval no longer holds back the first step, and the figure
it is replaced by (the base model's eval loss, taken at the first scheduled eval with the
adapter switched off) is the one an eval before training gives. One Start reads the dataset
file once, PII gate included (the pipe: prepare -> recipe.build -> loop)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio import runs
from studio.config import RunConfig


@pytest.mark.slow
def test_the_step0_eval_comes_after_step_1_and_is_the_base_models(
    embedded_model, tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from studio.data import load, pii
    from studio.train import recipe
    from studio.train.jobs import JobManager
    from studio.train.prepare import load_training_rows, split_rows, tokenize_rows

    data = tmp_path / "rows.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for i in range(10):
            turns = [
                {"role": "user", "content": f"Order {i} never arrived."},
                {"role": "assistant", "content": '{"category": "shipping"}'},
            ]
            fh.write(json.dumps({"messages": turns}) + "\n")
    cfg = RunConfig(
        run_name="step0", dataset_path=str(data), max_seq_len=48, batch_size=2, max_steps=2,
        val_fraction=0.2, eval_steps=2, save_steps=2, learning_rate=1e-2, warmup_ratio=0.0,
        lora_r=4, lora_alpha=8, lora_dropout=0.0, target_modules="qv", allow_pii=False, seed=0,
    )  # fmt: skip
    # Every parse of a dataset file goes through `load_dataset_file`: count them (the real
    # function still reads). The file was never scanned, so the PII gate scans it too.
    assert pii.unresolved_pii(data) is None
    reads: list[Path] = []
    real_load = load.load_dataset_file

    def counted(path, *args, **kwargs):
        reads.append(Path(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(load, "load_dataset_file", counted)
    manager = JobManager()
    run_dir = manager.start(cfg)  # the Train tab's Start
    snap = manager.wait(3600)  # a guard against a hang only: a loaded machine is slow
    monkeypatch.setattr(load, "load_dataset_file", real_load)
    assert snap.state == "completed", snap.message
    assert reads == [data], f"one Start read the dataset {len(reads)} times: {reads}"
    assert pii.unresolved_pii(data) == 0  # the gate scanned those rows and cached the scan
    log = runs.load_log(run_dir)
    kinds = [(e["kind"], e["step"]) for e in log if e.get("kind")]
    # step 1 is shown first; the step-0 eval comes with the first scheduled one (step 2)
    assert kinds[0] == ("train", 1), kinds
    assert [s for k, s in kinds if k == "eval"] == [0, 2]
    step0 = next(e["eval_loss"] for e in log if e.get("kind") == "eval" and e["step"] == 0)

    # The same validation rows, evaluated on the base model before any training.
    _, val_rows = split_rows(load_training_rows(cfg), cfg.val_fraction, cfg.seed)
    val_tok, _ = tokenize_rows(tokenizer, val_rows, cfg)
    model = recipe.load_base_model(cfg, embedded_model.path, "cpu")
    args = recipe.build_training_args(cfg, tmp_path / "eval", "cpu", True, False)
    trainer = recipe.build_trainer(cfg, model, tokenizer, args, "cpu", val_tok, val_tok)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(step0, abs=1e-4)


def test_the_train_tab_ends_on_the_runs_average_from_its_log() -> None:
    """The last window's rate (here 21, an eval and a checkpoint in it) is not the run's
    figure: once it ended, the tab shows the log's avg_tokens_per_s."""
    from dataclasses import replace

    from studio.train.jobs import JobSnapshot
    from studio.ui.train_tab import progress_markdown

    history = [
        {"kind": "train", "step": 1, "tokens_per_s": 90.0, "avg_tokens_per_s": 40.2},
        {"kind": "train", "step": 2, "tokens_per_s": 21.0, "avg_tokens_per_s": 70.3},
    ]
    running = JobSnapshot(
        state="running", run_name="r", step=2, total_steps=3, tokens_per_s=21.0, history=history
    )
    assert "21 trained tokens/s (average 70)" in progress_markdown(running)
    done = progress_markdown(replace(running, state="completed"))
    assert "70 trained tokens/s on average" in done and "21 trained" not in done
