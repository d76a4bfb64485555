"""A run killed (SIGKILL) anywhere is listed as interrupted and resumes to the end.

`python -m studio.train RUN.yaml` trains the real embedded model (4 steps, a checkpoint every
step) and kills itself at one point through the engine's test hook (`runs.kill_point`, set by
LORA_STUDIO_TEST_KILL_AT): while tokenizing, in the first step, halfway through writing the
second checkpoint, and halfway through the final save. Each time the run list shows it as
interrupted, `python -m studio.train --resume RUN_DIR` goes on from the newest complete
checkpoint (from the start when there is none) to step 4, and a half-written checkpoint is
never the newest one a resume would pick.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from studio import runs
from studio.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kill-data") / "rows.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for i in range(12):
            row = {
                "messages": [
                    {"role": "user", "content": f"Package {i} is late, where is it?"},
                    {"role": "assistant", "content": '{"category": "shipping"}'},
                ]
            }
            fh.write(json.dumps(row) + "\n")
    return path


def train(args: list[str], home: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORA_STUDIO_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop(runs.KILL_ENV, None)
    if kill_at:
        env[runs.KILL_ENV] = kill_at
    cmd = [sys.executable, "-m", "studio.train", *args, "--data-dir", str(home)]
    # The timeout only guards against a hang: a resume also generates the answer checks.
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def checkpoint_folders(run_dir: Path) -> dict[int, bool]:
    """Every checkpoint-N folder on disk: N -> whether its trainer_state.json is whole."""
    found = {}
    for sub in (run_dir / runs.CHECKPOINTS).glob("checkpoint-*"):
        try:
            json.loads((sub / "trainer_state.json").read_text(encoding="utf-8"))
            found[int(sub.name.split("-")[1])] = True
        except (OSError, ValueError):
            found[int(sub.name.split("-")[1])] = False
    return found


# (kill point, the newest complete checkpoint it leaves: the step a resume starts from)
POINTS = [
    ("tokenize", 0),
    ("step1", 0),
    ("checkpoint-2", 1),
    ("final", STEPS),
]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "resume_step"), POINTS)
def test_a_run_killed_anywhere_is_interrupted_and_resumes_to_the_end(
    embedded_model, studio_home: Path, rows: Path, tmp_path: Path, point: str, resume_step: int
) -> None:
    name = f"kill-{point}"
    cfg = RunConfig(
        run_name=name,
        dataset_path=str(rows),
        max_seq_len=48,
        batch_size=2,
        max_steps=STEPS,
        save_steps=1,
        val_fraction=0.0,
        lora_r=4,
        lora_alpha=8,
        target_modules="attention",
        allow_pii=True,
        seed=0,
    )
    killed = train([str(cfg.save(tmp_path / "run.yaml"))], studio_home, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert "Run folder:" in killed.stdout  # said before any work, so a kill leaves it known
    (run_dir,) = (studio_home / "runs").glob(f"{name}-*")

    listed = {info.path: info for info in runs.list_runs(studio_home / "runs")}
    assert listed[run_dir].status == "interrupted"
    newest = runs.latest_checkpoint(run_dir)
    assert (int(newest.name.split("-")[1]) if newest else 0) == resume_step
    on_disk = checkpoint_folders(run_dir)
    if point == "checkpoint-2":  # the kill left checkpoint-2 half-written: not the newest
        assert on_disk.get(2) is False, on_disk
    assert not (run_dir / runs.ADAPTER).exists()

    done = train(["--resume", str(run_dir)], studio_home)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "COMPLETED" in done.stdout
    info = runs.open_run(run_dir)
    assert (info.status, info.steps) == ("completed", STEPS)
    log = runs.load_log(run_dir)
    assert [e["from_step"] for e in log if e.get("event") == "resumed"] == [resume_step]
    assert [e["step"] for e in log if e.get("kind") == "train"] == list(range(1, STEPS + 1))
    assert (run_dir / runs.ADAPTER / "adapter_model.safetensors").is_file()
    assert all(checkpoint_folders(run_dir).values()), checkpoint_folders(run_dir)
    meta = runs.read_metadata(run_dir)
    assert meta["status"] == "completed" and meta["resumes"][-1]["from_step"] == resume_step
