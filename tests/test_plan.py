"""The recipe sizing (studio/train/plan.py): step counts worked out by hand, floor and cap hit,
the one-line explanation, edited fields winning, and the pre-flight on real tokenized rows.

Step counts follow the trainer's rule: batches per epoch = ceil(rows / batch_size), optimizer
steps per epoch = ceil(batches / grad_accum).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.config import RunConfig
from studio.hardware.presets import REPO_PRESETS, BandDefaults, load_preset_file
from studio.train import plan as planner


def band(**changes) -> BandDefaults:
    """A GPU-like band: 3 epochs, floor 60 steps, cap 2000 steps, at most 10 epochs."""
    values = dict(
        method="lora", batch_size=2, grad_accum=8, max_seq_len=1024,
        gradient_checkpointing=False, optimizer="paged_adamw_8bit", lora_r=16, lora_alpha=32,
        lora_dropout=0.05, target_modules="all_linear", learning_rate=5e-4, warmup_ratio=0.03,
        epochs=3, min_steps=60, step_cap=2000, max_epochs=10,
    )  # fmt: skip
    values.update(changes)
    return BandDefaults(**values)


@pytest.mark.parametrize(
    ("rows", "batch", "accum", "per_epoch"),
    [
        (162, 2, 8, 11),  # 81 batches -> ceil(81 / 8)
        (162, 4, 1, 41),  # 41 batches (the last one of 2 rows)
        (162, 4, 2, 21),  # the measured default click-through: 21 steps
        (1000, 2, 8, 63),  # 500 batches -> ceil(500 / 8)
        (16, 16, 1, 1),
        (17, 16, 1, 2),
    ],
)
def test_steps_per_epoch_by_hand(rows: int, batch: int, accum: int, per_epoch: int) -> None:
    assert planner.steps_per_epoch(rows, batch, accum) == per_epoch


def test_small_dataset_gets_epochs_raised_to_the_floor() -> None:
    p = planner.plan_recipe(band(), 134_515_008, 162, 2, 8)
    # 11 steps per epoch; 3 epochs = 33 < 60, so ceil(60 / 11) = 6 epochs = 66 steps.
    assert (p.steps_per_epoch, p.settings["epochs"], p.total_steps, p.limit) == (11, 6, 66, "floor")


def test_tiny_dataset_stops_at_max_epochs() -> None:
    p = planner.plan_recipe(band(), 134_515_008, 5, 4, 1)
    # 2 steps per epoch; reaching 60 would need 30 epochs: stopped at 10 = 20 steps.
    assert (p.settings["epochs"], p.total_steps, p.limit) == (10, 20, "floor")


def test_ordinary_dataset_keeps_the_band_epochs() -> None:
    p = planner.plan_recipe(band(), 1_500_000_000, 1000, 2, 8)
    assert (p.settings["epochs"], p.total_steps, p.limit) == (3, 189, "")  # 63 x 3


def test_large_dataset_is_capped() -> None:
    p = planner.plan_recipe(band(), 7_600_000_000, 20_000, 4, 4)
    # 1250 steps per epoch; 3 epochs = 3750 > 2000, so 2000 / 1250 = 1.6 epochs = 2000 steps.
    assert (p.settings["epochs"], p.total_steps, p.limit) == (1.6, 2000, "cap")


def test_huge_dataset_gets_one_whole_epoch() -> None:
    p = planner.plan_recipe(band(), 7_600_000_000, 100_000, 4, 4)
    # 6250 steps per epoch: under one pass is never planned.
    assert (p.settings["epochs"], p.total_steps, p.limit) == (1, 6250, "cap")


def test_plan_settings_and_line() -> None:
    p = planner.plan_recipe(band(), 134_515_008, 162, 2, 8, tokens_per_row=100, tokens_per_s=1000)
    assert p.settings == {
        "learning_rate": 5e-4, "epochs": 6, "lora_r": 16, "lora_alpha": 32,
        "target_modules": "all_linear", "warmup_ratio": 0.03,
    }  # fmt: skip
    assert p.seconds == pytest.approx(66 * 16 * 100 / 1000)  # 105.6 s
    assert p.line == (
        "162 rows, 135M model: 6 epochs (raised so a small dataset gets enough steps) at lr"
        " 5e-4, all-linear r 16, ~66 steps, about 2 min here"
    )
    RunConfig(**p.settings).validate()  # the Train tab takes the settings as they are


def test_no_throughput_means_no_time_and_no_rows_is_refused() -> None:
    p = planner.plan_recipe(band(tokens_per_s=0), 8_000_000_000, 1000, 2, 8, tokens_per_row=90)
    assert p.seconds is None and "here" not in p.line and "8B model" in p.line
    with pytest.raises(ValueError, match="no training rows"):
        planner.plan_recipe(band(), 8_000_000_000, 0, 2, 8)


def test_edited_fields_win_over_the_plan() -> None:
    p = planner.plan_recipe(band(), 134_515_008, 162, 2, 8)
    assert planner.planned_fields(p, {"learning_rate"}) == {"epochs": 6, "warmup_ratio": 0.03}
    assert planner.planned_fields(p, set()) == {
        "learning_rate": 5e-4, "epochs": 6, "warmup_ratio": 0.03,
    }  # fmt: skip


def test_cpu_default_recipe_for_the_sample() -> None:
    """The CPU preset on the bundled sample's 162 training rows (180 x 0.9) with the embedded
    135M model: enough steps to learn the answer format, every linear layer adapted."""
    cpu = load_preset_file(REPO_PRESETS / "cpu.yaml")
    b = cpu.bands["up_to_1b"]
    p = planner.plan_recipe(b, 134_515_008, 162, b.batch_size, b.grad_accum)
    assert p.total_steps >= b.min_steps
    assert p.settings["target_modules"] == "all_linear"
    assert p.settings["learning_rate"] >= 1e-3  # 2e-4 taught nothing in 21 steps
    defaults = RunConfig()  # headless, with no preset: the same run as the default click-through
    assert {k: getattr(defaults, k) for k in p.settings} == p.settings
    # Batch 4 (the 135M model fits), where the preset says 2 x 2 (0.5B fits 16 GiB): 41 steps.
    assert defaults.effective_batch == b.batch_size * b.grad_accum


def test_cpu_plan_line_for_the_sample_says_what_the_first_run_measured(
    sample_dataset_path, tokenizer, own_data_dir
) -> None:
    """The default first run's plan line at the CPU preset's rate (a fresh data dir: no run
    measured yet). `python -m studio.bench firstrun` trained these 41 steps in 1.59 min, so
    the line says about 2 min (the old 130 tokens/s said about 4)."""
    cfg = RunConfig(preset="cpu", dataset_path=str(sample_dataset_path), allow_pii=True)
    planned = planner.plan_run(cfg, tokenizer)
    assert planned.preflight.time_source.startswith("the preset's")
    assert planned.line.endswith("~41 steps, about 2 min here"), planned.line


def test_suggested_max_len_is_p99_rounded_up() -> None:
    lengths = list(range(1, 101))  # p99 (nearest rank) = 99 -> 128
    assert planner.suggested_max_len(lengths) == 128
    assert planner.suggested_max_len([700] * 99 + [5000]) == 704  # one outlier ignored
    assert planner.suggested_max_len([]) == 64


def test_preflight_counts_rows_left_out_and_suggests_a_length(tmp_path: Path, tokenizer) -> None:
    reply = '{"category": "billing", "priority": "low", "answer": "Done."}'
    rows = [
        {"messages": [{"role": "user", "content": f"Ticket {i}: refund please"},
                      {"role": "assistant", "content": reply}]}
        for i in range(9)
    ]  # fmt: skip
    long_question = "word " * 300  # ~300 tokens: at max length 128 the reply is cut off
    rows.append(
        {"messages": [{"role": "user", "content": long_question},
                      {"role": "assistant", "content": reply}]}
    )  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    cfg = RunConfig(
        dataset_path=str(path), val_fraction=0.0, max_seq_len=128, batch_size=3, grad_accum=1
    )

    pf = planner.preflight(cfg, tokenizer, tokens_per_s=100.0, source="test")

    assert (pf.train_rows, pf.no_trained_token, pf.truncated) == (10, 1, 1)
    # 9 rows are kept (10 would make 4 batches): 3 steps of 3 rows, 9 x mean length / 100 tok/s.
    assert pf.steps == 3
    assert pf.seconds == pytest.approx(9 * pf.tokens_per_row / 100.0)
    assert pf.suggested_max_len == 64 * -(-max(planner_lengths(rows, tokenizer)) // 64)
    assert pf.truncated_at_suggested == 0
    lines = pf.lines()
    assert "1 row(s) would keep no trained token at max length 128" in lines[0]


def planner_lengths(rows: list[dict], tokenizer) -> list[int]:
    """Untruncated lengths, counted by the Dataset tab's token statistics."""
    from studio.data.tokens import token_lengths

    return token_lengths(rows, tokenizer)


def test_train_tab_fills_only_the_fields_not_edited(sample_dataset_path, tokenizer) -> None:
    """The Train tab's plan handler on the real components: the line and pre-flight show, a
    typed-in learning rate is kept, the untouched epochs and warmup take the plan."""
    import gradio as gr

    from studio.ui import train_tab

    with gr.Blocks():
        ctx: dict = {}
        ui = train_tab.build_train_tab(ctx)
        preset, model = gr.Textbox(), gr.Textbox()
    w = train_tab.TrainWiring(ui, {"hardware.preset": preset, "model.name": model}, None)
    values = {ui[name]: getattr(RunConfig(), name) for name in train_tab.FIELDS}
    values.update({preset: "rtx3060-12gb", model: "", ui["allow_pii"]: True})
    values.update({ui["learning_rate"]: 3e-5, ui["edited"]: ["learning_rate"]})
    values.update({ui["batch_size"]: 2, ui["grad_accum"]: 8})

    out = train_tab.plan_update(w, values)

    # 162 rows of the sample, 11 steps per epoch: the GPU band's floor of 60 gives 6 epochs.
    assert out[ui["epochs"]] == 6 and out[ui["warmup_ratio"]] == 0.03
    assert ui["learning_rate"] not in out  # typed in: the user's value wins
    text = out[ui["plan"]]
    assert "162 rows, 135M model: 6 epochs" in text and "lr 3e-5" in text
    assert "your own learning_rate kept" in text
    assert "suggested max length" in text and "66 optimizer steps" in text  # 6 x 11


@pytest.fixture()
def own_data_dir(studio_home: Path, tmp_path: Path):
    """A data dir of this test's own, so its runs do not show in other tests' run lists."""
    from studio import paths

    paths.set_data_dir(tmp_path)
    yield tmp_path
    paths.set_data_dir(studio_home)


def test_time_estimate_uses_the_last_completed_run_of_the_model(own_data_dir: Path) -> None:
    """A finished run's metadata (as loop.py writes it) gives tokens per second on this
    machine; a run of another model, or one that failed, does not count."""
    from studio import runs

    def finished(model: str, status: str, seconds: float) -> None:
        run_dir = runs.new_run_dir("tps")
        runs.write_metadata(
            run_dir,
            {
                "status": status, "created": f"2026-01-01T00:00:0{len(model) % 10}",
                "base_model": {"name": model}, "device": {"used": "cpu"},
                "dataset": {"train_tokens": 6000}, "plan": {"steps_per_epoch": 10},
                "total_steps": 20, "timings": {"train_s": seconds},
                "final_metrics": {"train_loss": 1.0},
            },
        )  # fmt: skip

    finished("my/model-a", "completed", 120.0)  # 2 epochs of 6000 tokens in 120 s
    finished("my/model-b", "completed", 10.0)
    finished("my/model-a", "failed", 1.0)
    assert planner.measured_tokens_per_s("my/model-a", "cpu") == pytest.approx(100.0)
    assert planner.measured_tokens_per_s("my/model-a", "cuda") is None
    assert planner.measured_tokens_per_s("my/model-c", "cpu") is None


def test_the_time_estimate_skips_short_runs_and_the_start_up(own_data_dir: Path) -> None:
    """Issue 25, item 11: after two 1-step runs (all start-up) the estimate took their rate;
    a 20-step run's steady rate counts, timed from its first logged step to its last."""
    import json

    from studio import runs

    def finished(steps: int, train_s: float, created: str, log: list[dict]) -> None:
        run_dir = runs.new_run_dir("rate")
        runs.write_metadata(
            run_dir,
            {
                "status": "completed", "created": created,
                "base_model": {"name": "my/model-r"}, "device": {"used": "cpu"},
                "dataset": {"train_tokens": 1000}, "plan": {"steps_per_epoch": 10},
                "total_steps": steps, "timings": {"train_s": train_s},
                "final_metrics": {"train_loss": 1.0},
            },
        )  # fmt: skip
        lines = [json.dumps(e) for e in log]
        (run_dir / runs.LOG).write_text("\n".join(lines) + "\n", encoding="utf-8")

    # 30 s of start-up, then 2 s per step of 100 tokens: 50 tokens/s once running
    steady = [
        {"kind": "train", "step": s, "elapsed_s": 30.0 + 2.0 * (s - 1), "loss": 1.0}
        for s in range(1, 21)
    ]
    finished(20, 68.0, "2026-01-01T00:00:01", steady)
    one = [{"kind": "train", "step": 1, "elapsed_s": 59.0, "loss": 1.0}]
    finished(1, 60.0, "2026-01-01T00:00:02", one)
    finished(1, 60.0, "2026-01-01T00:00:03", one)
    assert planner.measured_tokens_per_s("my/model-r", "cpu") == pytest.approx(50.0)
