"""The train, app and firstrun benchmarks keep working (tiny sizes; figures are printed, not
asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "studio.bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_train_bench_compares_both_recipes(embedded_model, tmp_path: Path) -> None:
    out = _bench(
        "train", "--rows", "8", "--steps", "2", "--max-len", "128", "--batch", "2",
        "--breakdown-steps", "1", "--json", str(tmp_path / "train.json"),
    )  # fmt: skip
    assert "(a) tutorial" in out and "(b) studio" in out and "ratio (b)/(a)" in out
    result = json.loads((tmp_path / "train.json").read_text(encoding="utf-8"))
    a, b = result["tutorial"], result["studio"]
    assert a["padding_share"] > 0.1  # rows padded to 128 tokens
    assert b["padding_share"] < a["padding_share"]  # padded only to the batch's longest row
    assert result["studio_padding_free"]["padding_share"] == 0.0
    assert "length-grouped" in b["precision"] and "compact head" in b["precision"]
    assert "TRL's fused head" in result["studio_trl_head"]["precision"]
    assert result["studio_fp32"]["precision"].startswith("fp32")
    for recipe in ("tutorial", "studio", "studio_padding_free", "studio_trl_head", "studio_fp32"):
        r = result[recipe]
        assert r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 and r["final_loss"] > 0
    assert result["ratio_labelled_tokens_per_s"] > 0 and "breakdown:" in out
    # (a) and (b) took turns: two timed steps each after the warm-up, a ratio per pair
    assert a["steps_timed"] == b["steps_timed"] == 2 == len(b["per_step"])
    spread = result["ratio_per_step_labelled"]
    assert spread["n"] == 2 and spread["min"] <= spread["median"] <= spread["max"]
    assert a["load_average_during"]["n"] >= 1 and "per-step ratio" in out


@pytest.mark.slow
def test_uipath_bench_runs_a_job_like_the_train_tab(embedded_model, tmp_path: Path) -> None:
    """The Train tab's path (JobManager, default evals and checkpoints, 1-second polling)
    against the studio recipe alone, at a tiny size."""
    out = _bench(
        "uipath", "--rows", "12", "--steps", "2", "--max-len", "96", "--batch", "2",
        "--json", str(tmp_path / "ui.json"),
    )  # fmt: skip
    assert "UI path:" in out and "goal >= 0.8x" in out
    result = json.loads((tmp_path / "ui.json").read_text(encoding="utf-8"))
    ui = result["ui_path"]
    assert ui["labelled_tokens_per_s"] > 0 and result["studio_recipe"]["steps_timed"] == 2
    assert ui["evals"] >= 1 and ui["saves"] >= 1 and ui["polls"] >= 1
    assert ui["shown_avg_tokens_per_s"] > 0 and result["ratio"] > 0


@pytest.mark.slow
def test_app_bench_times_the_page_start(studio_home: Path, tmp_path: Path) -> None:
    out = _bench("app", "--no-train", "--data-dir", str(studio_home), "--json", str(tmp_path / "a"))
    assert "page served" in out
    assert json.loads((tmp_path / "a").read_text(encoding="utf-8"))["page_served_s"] > 0


@pytest.mark.slow
@pytest.mark.browser
def test_app_bench_times_start_to_the_first_step(studio_home: Path, embedded_model, tmp_path):
    """Clicks Start in Chromium on the real app and waits for step 1 (a 2-step run)."""
    out = _bench("app", "--data-dir", str(studio_home), "--json", str(tmp_path / "a"))
    assert "click Start -> first training step shown" in out, out
    result = json.loads((tmp_path / "a").read_text(encoding="utf-8"))
    assert result["page_served_s"] > 0 and result["start_to_first_step_s"] > 0


@pytest.mark.slow
def test_firstrun_bench_runs_the_default_path_and_reports_the_verdicts(
    studio_home: Path, embedded_model, tmp_path: Path
) -> None:
    """The default first run at a tiny size: the redacted sample, the CPU preset, 2 steps,
    2 validation rows scored base vs fine-tune."""
    out = _bench(
        "firstrun", "--max-steps", "2", "--val-rows", "2", "--data-dir", str(studio_home),
        "--json", str(tmp_path / "f.json"),
    )  # fmt: skip
    assert "minutes to finish" in out and "did it learn?" in out and "ROUGE-L base" in out
    result = json.loads((tmp_path / "f.json").read_text(encoding="utf-8"))
    assert result["settings"]["preset"] and result["settings"]["max_steps"] == 2
    assert ".redacted-" in result["settings"]["dataset_path"]  # the Dataset tab's Redact
    assert result["minutes"] > 0 and result["final_metrics"]["step"] == 2
    names = {"eval loss went down", "it stops", "format learned", "base vs fine-tune differ"}
    assert names <= set(result["checks"])
    assert set(result["checks"].values()) <= {"green", "amber", "red", "n/a"}
    val = result["validation"]
    assert val["val_rows"] == 2 and val["format"] == "a JSON object"  # the sample's answers
    for key in ("base_format_rate", "tuned_format_rate", "base_rouge_l", "tuned_rouge_l"):
        assert 0.0 <= val[key] <= 1.0


@pytest.mark.slow
def test_gpu_bench_runs_every_section_on_cpu_with_tiny(embedded_model, tmp_path: Path) -> None:
    """`bench gpu --tiny`: the script a lent GPU runs keeps working (CPU, tiny shapes)."""
    out = _bench("gpu", "--tiny", "--json", str(tmp_path / "gpu.json"))
    report = json.loads((tmp_path / "gpu.json").read_text(encoding="utf-8"))
    for section in ("doctor", "selftest", "train", "long_context", "chat"):
        assert "error" not in report[section], report[section]
        assert section in out
    assert report["selftest"]["passed"]
    assert report["long_context"]["measured_longest"] is None  # needs CUDA, and says so
    assert "needs CUDA" in report["long_context"]["note"]
    for method in ("lora", "qlora"):  # equal texts in fp32; bf16 may flip a near tie
        assert isinstance(report["chat"][method]["same_as_alone"], bool)
        assert report["chat"][method]["batching"]["ab_turn"]["ratio_median"] > 0


def test_the_longest_length_search_finds_the_edge() -> None:
    from studio.tools.gpu import _longest

    for edge in (1024, 1300, 8192, 21_848, 40_000):
        found = _longest(lambda n, e=edge: n <= e)
        assert found is not None and found <= edge < found + 256, (edge, found)
    assert _longest(lambda n: False) is None
    assert _longest(lambda n: True) == 65_536
