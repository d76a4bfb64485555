"""Multi-process training through `accelerate launch`: real 2-process DDP runs on CPU (gloo).

`accelerate launch --cpu` starts a single process unless MPI is set up, so these runs use
`accelerate launch --multi_gpu --num_processes 2`, which starts two processes through torchrun;
with no GPU visible they train on the CPU over gloo, exactly as the studio's own launcher
(`distributed.launch_command`) does. Runs are 4 steps of batch 2 on 16 short rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from studio import compat, runs
from studio.config import RunConfig
from studio.train import distributed

ROOT = Path(__file__).resolve().parents[1]

# Relative tolerance between the 2-process and the 1-process loss curves. Both runs compute
# the same sums in another order (a gloo all-reduce of two half-batch gradients vs gradient
# accumulation of the same two half-batches in one process: accelerate shards the batches of
# one sampler, so each step sees the same rows): only rounding can differ. Both run in fp32
# (FP32 below): under bf16 autocast the rounding depends on the CPU's kernels (identical curves
# on an AVX512-BF16 EPYC, 1.2e-3 apart at step 3 on an AMX Xeon). A wrong effective batch (one
# process, batch 2, no accumulation) moved the losses by 0.7-1.1% at steps 1-3, so 0.1% leaves
# room for reduction-order rounding and still catches that.
LOSS_RTOL = 1e-3
FP32 = {"LORA_STUDIO_CPU_FP32": "1"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 short tickets with JSON replies (quick to tokenize, quick to learn)."""
    path = tmp_path_factory.mktemp("ddp-data") / "rows.jsonl"
    lines = []
    for i in range(16):
        reply = {"category": "shipping", "priority": "high" if i % 3 else "low", "order": 100 + i}
        messages = [
            {"role": "user", "content": f"Ticket {i}: my order {100 + i} has not arrived."},
            {"role": "assistant", "content": json.dumps(reply)},
        ]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def small_cfg(rows: Path, **changes) -> RunConfig:
    cfg = RunConfig(
        run_name="ddp",
        dataset_path=str(rows),
        device="cpu",
        max_seq_len=64,
        batch_size=2,
        grad_accum=1,
        learning_rate=2e-3,
        warmup_ratio=0.0,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,  # dropout draws differ per rank: no randomness in the comparison
        target_modules="qv",
        max_steps=4,
        val_fraction=0.0,
        save_steps=1,
        allow_pii=True,
        seed=0,
    )
    return cfg.replace(**changes)


def launch(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch ... -m studio.train ARGS` on 2 processes, as the Train tab runs it."""
    cmd = distributed.launch_command([*args, "--data-dir", str(home)], 2)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in runs.load_log(run_dir) if e.get("kind") == "train"}


@pytest.mark.slow
def test_two_processes_match_one_and_resume_after_a_kill(
    studio_home, embedded_model, rows, tmp_path, monkeypatch
):
    """2 ranks x batch 2 == 1 process x batch 2 x accumulation 2; killed at step 3, resumed."""
    monkeypatch.setenv(distributed.CPU_PROCESSES_ENV, "2")  # CPU processes stand in for 2 GPUs
    yaml_path = small_cfg(rows, run_name="ddp2").save(tmp_path / "run.yaml")
    killed = launch([str(yaml_path)], studio_home, LORA_STUDIO_TEST_KILL_AT="step3", **FP32)
    assert killed.returncode != 0, killed.stdout[-2000:] + killed.stderr[-2000:]
    found = sorted((studio_home / "runs").glob("ddp2-*"))
    assert len(found) == 1, found  # one run folder, not one per rank
    run_dir = found[0]
    assert runs.open_run(run_dir).status == "interrupted"
    assert runs.latest_checkpoint(run_dir).name == "checkpoint-2"
    assert (run_dir / distributed.FSDP_CONFIG).is_file()

    done = launch(["--resume", str(run_dir)], studio_home, **FP32)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "COMPLETED" in done.stdout
    assert done.stdout.count("COMPLETED") == 1  # rank 0 alone reports
    assert sorted((studio_home / "runs").glob("ddp2-*")) == [run_dir]
    info = runs.open_run(run_dir)
    assert (info.status, info.steps) == ("completed", 4)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    log = runs.load_log(run_dir)
    steps = [e["step"] for e in log if e.get("kind") == "train"]
    assert steps == [1, 2, 3, 4]  # each step logged once: rank 1 writes no log lines
    meta = runs.read_metadata(run_dir)
    assert meta["distributed"]["processes"] == 2
    assert meta["distributed"]["backend"] == "gloo"
    assert meta["effective_batch"] == 2 * 1 * 2
    last = runs.latest_checkpoint(run_dir)
    assert {p.name for p in last.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}

    from studio.train.jobs import run_training

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(*next(iter(FP32.items())))
        single = run_training(small_cfg(rows, run_name="one", grad_accum=2))
    assert single.status == "completed", single.message
    assert "fp32" in runs.read_metadata(single.run_dir)["recipe"]["precision"]
    ddp, one = train_losses(run_dir), train_losses(single.run_dir)
    assert sorted(one) == [1, 2, 3, 4]
    for step in one:
        assert ddp[step] == pytest.approx(one[step], rel=LOSS_RTOL), (step, ddp, one)
    assert one[4] < one[1]  # it trained: the curves agree on a falling loss


@pytest.mark.slow
def test_the_job_runs_qlora_on_two_processes_follows_the_log_and_stops_every_rank(
    studio_home, embedded_model, rows, monkeypatch
):
    """The Train tab's engine path: JobManager.start(processes=2) runs `accelerate launch` as
    a subprocess, shows progress from log.jsonl, and Stop (the stop file) ends both ranks at
    one step, with a checkpoint there and the adapter saved."""
    from studio.train.jobs import JobManager

    monkeypatch.setenv(distributed.CPU_PROCESSES_ENV, "2")
    manager = JobManager()
    cfg = small_cfg(rows, run_name="ddpjob", method="qlora", max_steps=40)
    run_dir = manager.start(cfg, processes=2)
    assert manager.snapshot().processes == 2
    deadline = time.time() + 600
    while manager.snapshot().step < 1 and manager.active and time.time() < deadline:
        time.sleep(0.5)
    snap = manager.snapshot()
    assert snap.step >= 1, (snap.state, snap.message, snap.log_lines[-5:])
    assert snap.history and snap.history[0]["kind"] == "train"  # followed from log.jsonl
    assert manager.stop()
    snap = manager.wait(timeout=600)
    assert snap.state == "stopped", (snap.message, snap.log_lines[-8:])
    info = runs.open_run(run_dir)
    assert info.status == "stopped"
    assert 1 <= info.steps < 40
    assert runs.latest_checkpoint(run_dir).name == f"checkpoint-{info.steps}"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run_dir / distributed.STOP_FILE).exists()  # a resume will not stop at once
    meta = runs.read_metadata(run_dir)
    assert (meta["settings"]["method"], meta["distributed"]["processes"]) == ("qlora", 2)
    answers = [c for c in meta["checks"] if c["name"] in ("it stops", "base vs fine-tune differ")]
    assert answers and all("4-bit generation on the CPU is slow" in c["detail"] for c in answers)
    assert meta["did_it_learn"]["prompts"] == 2  # 4-bit on the CPU: fewer, shorter answers
    assert sorted((studio_home / "runs").glob("ddpjob-*")) == [run_dir]


def test_the_fsdp_config_written_next_to_a_run_is_one_accelerate_reads(tmp_path):
    """accelerate's own config loader accepts the file and reads FSDP on N processes."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = distributed.write_fsdp_config(tmp_path, "Qwen/Qwen2.5-14B-Instruct", 2)
    loaded = load_config_from_file(str(path))
    assert str(loaded.distributed_type) in ("FSDP", "DistributedType.FSDP")
    assert loaded.num_processes == 2
    assert loaded.fsdp_config["fsdp_version"] == 2


def test_only_rank_zero_writes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched() and not distributed.is_main()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.is_main()
    monkeypatch.delenv("WORLD_SIZE")
    assert not distributed.launched()


def test_only_rank_zero_writes_the_token_cache_and_the_other_ranks_read_it(
    monkeypatch, studio_home
):
    """Every rank tokenizes the same rows; rank 0 alone writes the cache file (no N-way race
    on one file), and a rank > 0 reads what rank 0 wrote."""
    from studio.train.prepare import load_token_cache, save_token_cache

    value = ([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}], {"rows": 1}, [], {"rows": 0})
    key = "ranks" + "0" * 27
    cached = studio_home / "cache" / "tokens" / f"{key}.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert save_token_cache(key, value) is False
    assert not cached.exists() and load_token_cache(key) is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert save_token_cache(key, value) is True
    assert cached.is_file()
    monkeypatch.setenv("RANK", "1")
    assert load_token_cache(key) == value


def test_the_launch_command_runs_studio_train_on_n_processes(monkeypatch):
    monkeypatch.setattr(compat, "nccl_available", lambda: True)  # a Linux CUDA torch
    cmd = distributed.launch_command(["run.yaml"], 3)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "3"
    assert cmd[-3:] == ["-m", "studio.train", "run.yaml"]


# --- the job's side: the app's exit, a rank's failure ----------------------------------------
# `accelerate launch` is replaced by a stand-in launcher (the thing under test is the job
# manager's handling of the processes, not training): like rank 0 it creates and claims the
# run folder and announces it; like torchrun it starts a "rank" in a session of its own.

STANDIN_LAUNCHER = """
import subprocess, sys, time
from studio import paths, runs
paths.set_data_dir(sys.argv[1])
run_dir = runs.new_run_dir("standin")
runs.write_metadata(run_dir, {"status": "running", "run_name": "standin"})
runs.mark_live(run_dir)
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                        start_new_session=True)
(run_dir / "pids").write_text(f"{__import__('os').getpid()} {rank.pid}")
print(f"Run folder: {run_dir}", flush=True)
time.sleep(300)  # deaf to the stop file: it has to be killed
"""

APP_THAT_CLOSES = """
import sys
from studio.config import RunConfig
from studio.train import distributed, jobs
distributed.launch_command = lambda args, n: [sys.executable, "-c", sys.argv[1], args[-1]]
jobs.STOP_GRACE_S, jobs.KILL_GRACE_S = 1.0, 3.0
run_dir = jobs.get_manager().start(RunConfig.load(sys.argv[2]), processes=2)
print(run_dir, flush=True)
# the script ends here with the run going: the interpreter's exit has to stop it
"""


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_the_apps_exit_stops_a_launched_run_and_records_it_interrupted(studio_home, rows, tmp_path):
    """An app that exits with a multi-process run going: the stop file first, then the
    launcher and its rank (in a session of its own, as torchrun starts ranks) are killed, and
    the run reads "interrupted" with why, not "running"."""
    import psutil

    yaml_path = small_cfg(rows, run_name="closing").save(tmp_path / "run.yaml")
    env = {**os.environ, distributed.CPU_PROCESSES_ENV: "2"}
    app = subprocess.run(
        [sys.executable, "-c", APP_THAT_CLOSES, STANDIN_LAUNCHER, str(yaml_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert app.returncode == 0, app.stderr[-3000:]
    run_dir = Path(app.stdout.strip().splitlines()[-1])
    pids = [int(x) for x in (run_dir / "pids").read_text().split()]
    try:
        assert (run_dir / distributed.STOP_FILE).is_file()  # asked to stop first
        assert all(_gone(pid) for pid in pids), pids
        info = runs.open_run(run_dir)
        assert info.status == "interrupted"
        meta = runs.read_metadata(run_dir)
        assert meta["status"] == "interrupted" and "app closed" in meta["message"]
        assert runs.load_log(run_dir)[-1]["event"] == "finished"
    finally:
        for pid in pids:  # a failed run of this test must not leave its stand-ins behind
            if not _gone(pid):
                psutil.Process(pid).kill()


STANDIN_FAILING_RANKS = """
import sys, time
from studio import paths, runs
from studio.config import RunConfig
from studio.train import distributed
from studio.train.loop import TrainResult, oom_advice, write_end
paths.set_data_dir(sys.argv[1])
run_dir = runs.new_run_dir("ranks")
runs.write_metadata(run_dir, {"status": "running", "run_name": "ranks"})
runs.mark_live(run_dir)
print(f"Run folder: {run_dir}", flush=True)
t = time.time()
message, advice, retry = oom_advice(RunConfig(batch_size=4), "cpu", MemoryError("rank 1"))
rank1 = TrainResult(run_dir, "failed", message, advice, retry, failed_at=t)
# rank 0 then loses rank 1 in its all-reduce, and records that echo as the run's end
rank0 = TrainResult(run_dir, "failed", "Training failed: RuntimeError: Connection closed by peer",
                    failed_at=t + 0.5)
write_end(run_dir, runs.read_metadata(run_dir), rank0)
print(distributed.failure_line(0, rank0), flush=True)  # printed first, happened later
print("\\r 33%|###   | 2/6 [00:04<00:08]", end="", flush=True)  # rank 0's bar, left open
print(distributed.failure_line(1, rank1), flush=True)
sys.exit(1)
"""


def test_a_failed_rank_fails_the_run_with_its_own_error_and_advice(studio_home, rows, monkeypatch):
    """Rank 1 runs out of memory, rank 0 fails after it (lost connection) and records that:
    the job records the run as failed with rank 1's error, advice and retry config."""
    from studio.train.jobs import JobManager

    monkeypatch.setenv(distributed.CPU_PROCESSES_ENV, "2")
    monkeypatch.setattr(
        distributed,
        "launch_command",
        lambda args, n: [sys.executable, "-c", STANDIN_FAILING_RANKS, args[-1]],
    )
    manager = JobManager()
    run_dir = manager.start(small_cfg(rows, run_name="ranks"), processes=2)
    snap = manager.wait(timeout=120)
    assert snap.state == "failed", (snap.state, snap.message)
    assert snap.message.startswith("Rank 1 of 2 failed: Out of system memory"), snap.message
    assert any("Halve the batch" in line for line in snap.advice), snap.advice
    assert snap.retry_config and snap.retry_config["batch_size"] == 2
    meta = runs.read_metadata(run_dir)
    assert (meta["status"], meta["error"]) == ("failed", snap.message)
    assert meta["advice"] == snap.advice
    assert runs.open_run(run_dir).status == "failed"


# --- the app's side: hardware, doctor, the Train tab's offer ---------------------------------

GIB = 2**30


@pytest.fixture
def two_cards(monkeypatch):
    """A PC with an RTX 3090 (24 GiB, 20 free) and an RTX 3060 (12 GiB, 11 free), as torch
    would report them; detection runs its real code on these answers."""
    import torch

    from studio import heavy
    from studio.hardware import detect

    heavy.ready()  # peft's import probes CUDA streams: import it before CUDA is faked
    cards = [("NVIDIA GeForce RTX 3090", 24, 20), ("NVIDIA GeForce RTX 3060", 12, 11)]
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: SimpleNamespace(
            name=cards[i][0], total_memory=cards[i][1] * GIB, major=8, minor=6, uuid=""
        ),
    )
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda i: (cards[i][2] * GIB, cards[i][1] * GIB)
    )
    monkeypatch.setattr(detect, "own_cuda_bytes", lambda gpu: 0)
    return cards


def test_the_hardware_report_lists_every_gpu_and_offers_them_all(two_cards):
    from studio.hardware import detect

    report = detect.detect().to_dict()
    assert [(g["name"], g["total_bytes"] // GIB) for g in report["gpus"]] == [
        ("NVIDIA GeForce RTX 3090", 24),
        ("NVIDIA GeForce RTX 3060", 12),
    ]
    note = next(n for n in report["notes"] if "2 GPUs found" in n)
    assert "RTX 3060 12 GiB" in note and "Use all 2 GPUs" in note


def test_the_ddp_estimate_holds_the_whole_model_on_each_card_and_judges_the_smallest(two_cards):
    from studio.config import DEFAULT_MODEL
    from studio.hardware import detect, vram
    from studio.ui.hardware_tab import ddp_markdown

    report = detect.detect().to_dict()
    shape = vram.model_shape(DEFAULT_MODEL)
    est = vram.estimate(shape, {}, capacity_bytes=24 * GIB, in_use_bytes=0, device="cuda")
    d = vram.ddp_per_gpu(est.total_bytes, est.trainable_params, report["gpus"])
    # every rank: the one-card estimate at the same per-device batch, plus DDP's buckets
    assert d["per_gpu_bytes"] > est.total_bytes
    assert d["per_gpu_bytes"] - est.total_bytes == 4 * est.trainable_params + vram.DDP_NCCL_BYTES
    assert d["tightest"] == "GPU 1: NVIDIA GeForce RTX 3060"
    assert d["available_bytes"] == 11 * GIB
    assert "With all 2 GPUs (DDP)" in ddp_markdown(est, report)
    assert ddp_markdown(est, {"gpus": report["gpus"][:1]}) == ""  # one card: nothing to add


def test_the_ddp_estimate_judges_the_card_with_least_free_memory_not_the_smallest(two_cards):
    """The app's own CUDA context and chat model stay on GPU 0 while the ranks (other
    processes) train: with 8 of its 24 GiB free, the 3090 binds, not the 3060's 11 free."""
    from studio.hardware import detect, vram

    two_cards[0] = ("NVIDIA GeForce RTX 3090", 24, 8)
    report = detect.detect().to_dict()
    d = vram.ddp_per_gpu(10 * GIB, 1_000_000, report["gpus"])
    assert d["tightest"] == "GPU 0: NVIDIA GeForce RTX 3090"
    assert d["available_bytes"] == 8 * GIB
    assert d["verdict"] == vram.verdict_for(d["per_gpu_bytes"], 8 * GIB)


def test_doctor_reports_nccl_and_that_windows_needs_linux_or_wsl_for_several_gpus():
    from studio.hardware import doctor

    win = doctor.check_multi_gpu(system="Windows", nccl=lambda: False, gpus=2)
    assert win.status == "warning" and "Linux or WSL" in win.fix
    linux = doctor.check_multi_gpu(system="Linux", nccl=lambda: True, gpus=2)
    assert linux.status == "ok" and "NCCL available" in linux.detail
    no_nccl = doctor.check_multi_gpu(system="Linux", nccl=lambda: False, gpus=2)
    assert no_nccl.status == "warning" and "NCCL not available" in no_nccl.detail
    assert any(c.name == "Multi-GPU" for c in doctor.run_checks())


def test_the_train_tab_offers_several_processes_only_when_there_are_two(monkeypatch):
    from studio.hardware import detect

    monkeypatch.delenv(distributed.CPU_PROCESSES_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    smi = [{"name": "RTX 3090"}, {"name": "RTX 3090"}]
    monkeypatch.setattr(detect, "nvidia_smi", lambda: smi)
    monkeypatch.setattr(compat, "nccl_available", lambda: True)  # a Linux CUDA torch
    assert distributed.offered_processes() == 2
    assert distributed.offer_label(2) == "Use all 2 GPUs"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert distributed.offered_processes() == 1  # one card visible: no offer
    monkeypatch.setattr(detect, "nvidia_smi", lambda: None)
    monkeypatch.setenv(distributed.CPU_PROCESSES_ENV, "2")
    assert distributed.offered_processes() == 2


@pytest.mark.slow
@pytest.mark.browser
def test_the_train_tab_starts_follows_and_stops_a_two_process_run(start_app, page, monkeypatch):
    """In Chromium: "Use 2 CPU processes" (LORA_STUDIO_CPU_PROCESSES=2 stands in for two
    GPUs), Start, the chart fills from the subprocess's log.jsonl, Stop ends both ranks."""
    from playwright.sync_api import expect

    from tests.ui_steps import set_train_settings

    monkeypatch.setenv(distributed.CPU_PROCESSES_ENV, "2")  # the app inherits it
    app = start_app()
    page.goto(app.url)
    page.get_by_role("tab", name="Train").click()
    wanted = {
        "train-run-name": ("ui-ddp", "run_name: ui-ddp"),
        "train-max-steps": ("60", "max_steps: 60"),
        "train-batch-size": ("2", "batch_size: 2"),
        "train-grad-accum": ("1", "grad_accum: 1"),
        "train-max-seq-len": ("160", "max_seq_len: 160"),
        "train-val-fraction": ("0.02", "val_fraction: 0.02"),
    }
    set_train_settings(page, wanted)
    offer = page.locator("#train-all-gpus")
    expect(offer).to_contain_text("Use 2 CPU processes")
    offer.locator("input").check()
    before = {r.name for r in runs.list_runs()}
    notice = page.locator("#train-notice")
    page.locator("#train-start").click()  # the bundled sample's planted PII: confirm first
    expect(notice).to_contain_text("Not started", timeout=60_000)
    page.locator("#train-allow-pii input").check()
    page.locator("#train-start").click()
    expect(notice).to_contain_text("Started ui-ddp", timeout=300_000)
    (run_name,) = {r.name for r in runs.list_runs()} - before

    progress = page.locator("#train-progress")
    expect(progress).to_contain_text("2 processes (accelerate)", timeout=30_000)
    chart_traces = page.locator("#train-chart .scatterlayer .trace")
    deadline = time.time() + 600
    while time.time() < deadline and chart_traces.count() == 0:
        page.wait_for_timeout(1000)
    assert chart_traces.count() > 0, progress.inner_text()
    page.locator("#train-stop").click()
    expect(progress).to_contain_text("Stopped", timeout=600_000)
    run_dir = page.locator("#train-run-dir textarea").input_value()
    info = runs.open_run(run_dir)
    assert (info.name, info.status) == (run_name, "stopped")
    assert 1 <= info.steps < 60
    assert runs.latest_checkpoint(run_dir).name == f"checkpoint-{info.steps}"
    assert (info.path / "adapter" / "adapter_model.safetensors").is_file()
    assert runs.read_metadata(run_dir)["distributed"]["processes"] == 2
