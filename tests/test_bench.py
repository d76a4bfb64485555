"""The train and app benchmarks keep working (tiny sizes; figures are printed, not asserted)."""

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
        "--json", str(tmp_path / "train.json"),
    )  # fmt: skip
    assert "(a) tutorial" in out and "(b) studio" in out and "ratio (b)/(a)" in out
    result = json.loads((tmp_path / "train.json").read_text(encoding="utf-8"))
    a, b = result["tutorial"], result["studio"]
    assert a["padding_share"] > 0.1  # rows padded to 128 tokens
    assert b["padding_share"] == 0.0  # padding-free batches
    assert a["tokens_per_s"] > 0 and b["tokens_per_s"] > 0


@pytest.mark.slow
def test_app_bench_times_the_page_start(studio_home: Path, tmp_path: Path) -> None:
    out = _bench("app", "--no-train", "--data-dir", str(studio_home), "--json", str(tmp_path / "a"))
    assert "page served" in out
    assert json.loads((tmp_path / "a").read_text(encoding="utf-8"))["page_served_s"] > 0
