"""The data benchmark runs end to end at a tiny size and prints its figures.

The speed/memory targets themselves are checked by running `python -m studio.bench data`
(100,000 rows) by hand, not by timed assertions here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_data_benchmark_prints_its_figures(studio_home: Path, embedded_model) -> None:
    env = {**os.environ, "LORA_STUDIO_HOME": str(studio_home)}
    done = subprocess.run(
        [sys.executable, "-m", "studio.bench", "data", "--rows", "500"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, done.stderr + out
    assert "generated 500 rows" in out
    speed = re.search(r"500 rows in ([\d.]+) s = ([\d,]+) rows/s", out)
    assert speed and float(speed.group(1)) > 0 and int(speed.group(2).replace(",", "")) > 0
    assert re.search(r"PII scan: [\d.]+ s, [\d,]+ findings in [\d,]+ rows", out)
    peak = re.search(r"peak memory: ([\d,]+) MB RSS", out)
    assert peak and int(peak.group(1).replace(",", "")) > 0
    tokens = re.search(
        r"token lengths: 500 rows in ([\d.]+) s.*p50 (\d+), p95 (\d+), max (\d+)", out
    )
    assert tokens and 0 < int(tokens.group(2)) <= int(tokens.group(3)) <= int(tokens.group(4))


def test_bench_lists_its_commands() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "studio.bench", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and "data" in done.stdout
