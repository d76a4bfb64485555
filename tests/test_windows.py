"""Windows, checked on Linux: what a Windows PC does differently, reproduced here.

A cp1252 console is `PYTHONIOENCODING=cp1252:strict`; Windows' missing POSIX modules are
removed from a child interpreter; Defender holding a file is a PermissionError with WinError 32;
a reused process id is a live process whose start time differs from the recorded one. Where
only the platform flag differs (NCCL, paged optimizers, the driver's sysmem fallback),
`compat.IS_WINDOWS` is set. What only a Windows PC can prove is listed in README's Windows
section.
"""

from __future__ import annotations

import codecs
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio import compat, paths, runs
from studio.config import RUN_NAME_MAX, ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]
from studio import install  # noqa: E402  (stdlib only: it runs before anything is installed)

VIETNAMESE = "thử-nghiệm"


# --------------------------------------------------------------------------- the installer

SMI_HEADER = """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI {driver}                 Driver Version: {driver}         CUDA Version: {cuda}     |
|-----------------------------------------+------------------------+----------------------+
| GPU  Name                  Driver-Model | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA GeForce RTX 3060      WDDM  |   00000000:01:00.0  On |                  N/A |
"""


@pytest.mark.parametrize(
    ("smi", "build", "says"),
    [
        (None, "cpu", "no NVIDIA card"),  # no card: no nvidia-smi at all
        (SMI_HEADER.format(driver="472.12", cuda="11.4"), "cpu", "update the NVIDIA driver"),
        (SMI_HEADER.format(driver="551.86", cuda="12.4"), "cu126", "CUDA 12.4"),
        (SMI_HEADER.format(driver="572.16", cuda="12.8"), "cu126", "CUDA 12.8"),
        (SMI_HEADER.format(driver="580.88", cuda="13.0"), "cu130", "CUDA 13.0"),
        (SMI_HEADER.format(driver="595.02", cuda="13.2"), "cu130", "CUDA 13.2"),
        ("NVIDIA-SMI has failed because it couldn't communicate with the driver", "cpu", "no"),
    ],
)
def test_the_installer_picks_the_torch_build_the_driver_runs(smi, build, says) -> None:
    choice = install.choose_torch(smi)
    assert choice.build == build
    assert says in choice.reason
    assert choice.index_url == f"https://download.pytorch.org/whl/{build}"


def test_the_installer_installs_torch_from_its_index_then_the_requirements() -> None:
    """A CUDA build from PyTorch's index; the CPU build from pip's own index (what a plain
    `pip install -r requirements.txt` takes: it works where PyTorch's index is out of reach)."""
    pinned = [
        line for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
        if line.startswith("torch==")
    ]  # fmt: skip
    smi = SMI_HEADER.format(driver="560.94", cuda="12.6")
    torch_cmd, rest = install.pip_commands(install.choose_torch(smi))
    assert torch_cmd[-3:] == [pinned[0], "--index-url", "https://download.pytorch.org/whl/cu126"]
    assert rest[-2:] == ["-r", str(ROOT / "requirements.txt")]
    torch_cmd, rest = install.pip_commands(install.choose_torch(None))
    assert torch_cmd[-1] == pinned[0] and "--index-url" not in torch_cmd


# --------------------------------------------------------------------------- run names and paths


@pytest.mark.parametrize("name", ["con", "NUL", "com1.x", "Lpt9", "aux.tar.gz", "CON.txt", "PRN"])
def test_names_windows_reserves_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=r"run_name.*Windows reserves"):
        RunConfig(run_name=name).validate()


@pytest.mark.parametrize("name", ["console", "nullable", "com10", "auxiliary.v2", VIETNAMESE])
def test_names_that_only_look_reserved_are_kept(name: str) -> None:
    assert RunConfig(run_name=name).validate().run_name == name


@pytest.mark.slow
def test_the_longest_path_fits_windows_and_the_export_cli_prints_on_cp1252(
    studio_home: Path, embedded_model, monkeypatch, tmp_path: Path
) -> None:
    """A run with the longest name allowed, checkpoints, and two exports (the second goes to
    export-<stamp>/ with its GGUF): every path it wrote, under C:\\Users\\<24 letters>\\, stays
    under Windows' 260. Paths inside an export are seen before its folder is renamed. The name
    is Latin after its first letter: the GGUF file repeats it, and only ASCII letters stay."""
    from studio.export import run as export
    from studio.train.jobs import run_training

    seen: list[Path] = []
    real_replace = compat.replace

    def watching(src, dst):
        if Path(src).is_dir():
            seen.extend(Path(src).rglob("*"))
        return real_replace(src, dst)

    monkeypatch.setattr(compat, "replace", watching)
    from studio.models import tiny

    # A one-layer random Llama: the paths are the run's and the export's, not the model's,
    # and the 135M model's two GGUF exports took most of this test's minutes.
    base = tiny.build_model("llama", tmp_path / "tiny-llama", layers=1)
    cfg = RunConfig(
        run_name="ệ" + "x" * (RUN_NAME_MAX - 1), max_steps=2, save_steps=1, max_seq_len=64,
        batch_size=2, val_fraction=0.0, device="cpu", allow_pii=True, base_model=str(base),
    )  # fmt: skip
    result = run_training(cfg)
    assert result.status == "completed", result.message
    # The first export through the CLI on a cp1252 console (its report names the run),
    # the second in-process, where its folder's paths are watched before the rename.
    cli = ["-m", "studio.export", str(result.run_dir), "--gguf", "f16"]
    done = _cp1252([*cli, "--data-dir", str(studio_home)], studio_home)
    assert done.returncode == 0, done.stderr.decode("cp1252")[-2000:]
    assert "\\u1ec7" in done.stdout.decode("cp1252")  # "ệ", escaped instead of a crash
    export.export_run(result.run_dir, gguf="f16", n_prompts=1, max_new_tokens=4)
    seen.extend(Path(result.run_dir).rglob("*"))
    home = compat.LONG_HOME + "\\.lora-studio\\"
    longest = max((str(p.relative_to(paths.data_dir())) for p in seen), key=len)
    # What one run cannot show: a same-second clash suffix on the run folder ("-99") and a
    # quantized GGUF type ("q4_K_M") three letters longer than "f16", in both names.
    spare = 3 + 3
    assert len(home + longest) + spare < compat.MAX_PATH, home + longest


# --------------------------------------------------------------------------- renames


def _busy_replace(monkeypatch, fails: int | None) -> list[tuple[str, str]]:
    """os.replace refused as Defender refuses it (WinError 32), `fails` times (None: always)."""
    calls: list[tuple[str, str]] = []
    real = os.replace

    def replace(src, dst):
        calls.append((str(src), str(dst)))
        if fails is None or len(calls) <= fails:
            exc = PermissionError(13, "The process cannot access the file")
            exc.winerror = 32
            raise exc
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(compat, "REPLACE_DELAY_S", 0.001)
    return calls


def test_a_rename_windows_refuses_for_a_moment_is_retried(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "training_metadata.json"
    calls = _busy_replace(monkeypatch, fails=2)
    runs.atomic_write_json(target, {"run_name": VIETNAMESE})
    assert len(calls) == 3
    assert json.loads(target.read_text(encoding="utf-8")) == {"run_name": VIETNAMESE}


def test_a_rename_refused_every_time_says_why_and_loses_nothing(
    tmp_path: Path, monkeypatch
) -> None:
    run_dir = tmp_path / "run"
    final, staging, _old = runs.adapter_staging(run_dir)
    for folder, text in ((final, "v1"), (staging, "v2")):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_text(text, encoding="utf-8")
    calls = _busy_replace(monkeypatch, fails=None)
    with pytest.raises(compat.FileBusyError) as caught:
        runs.publish_adapter(run_dir)
    assert len(calls) == compat.REPLACE_ATTEMPTS
    message = str(caught.value)
    assert "antivirus" in message and "Nothing was lost" in message and str(final) in message
    assert (final / "adapter_model.safetensors").read_text(encoding="utf-8") == "v1"
    assert (staging / "adapter_model.safetensors").read_text(encoding="utf-8") == "v2"


def test_a_real_permission_problem_is_not_retried(tmp_path: Path, monkeypatch) -> None:
    calls: list[int] = []

    def denied(src, dst):
        calls.append(1)
        raise PermissionError(13, "Permission denied")  # POSIX: no winerror, not passing

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(PermissionError):
        runs.atomic_write_text(tmp_path / "x.txt", "x")
    assert calls == [1]


# --------------------------------------------------------------------------- liveness


@pytest.fixture()
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_reused_process_id_does_not_keep_a_dead_run_running(
    tmp_path: Path, monkeypatch, other_process
) -> None:
    """Windows has no flock: the lock file names the trainer's id and start time. A run whose
    trainer died, its id now taken by another live process, is interrupted, not running."""
    monkeypatch.setattr(compat, "fcntl", None)
    monkeypatch.setattr(runs, "fcntl", None, raising=False)
    run_dir = runs.new_run_dir("reuse", root=tmp_path)
    pid = other_process.pid
    started = compat.process_started(pid)
    assert started is not None
    runs.write_metadata(run_dir, {"status": "running", "pid": pid, "created": "x"})
    (run_dir / runs.LOCK).write_text(f"{pid} {started - 3600}", encoding="utf-8")
    assert not runs.is_live(run_dir)
    assert runs.open_run(run_dir).status == "interrupted"
    (run_dir / runs.LOCK).write_text(f"{pid} {started}", encoding="utf-8")  # the trainer itself
    assert runs.is_live(run_dir)
    assert runs.open_run(run_dir).status == "running"
    with pytest.raises(RuntimeError, match="another process"):
        runs.mark_live(run_dir)  # Resume must not train it twice
    (run_dir / runs.LOCK).write_text(f"{pid} {started - 3600}", encoding="utf-8")
    runs.mark_live(run_dir)  # the dead trainer's run resumes here
    runs.mark_done(run_dir)


# --------------------------------------------------------------------------- POSIX-only calls

WITHOUT_POSIX = """
import os, signal, sys
import psutil  # Linux's psutil imports resource itself; Windows' psutil does not need it
del os.getloadavg
del signal.SIGHUP
sys.modules["fcntl"] = None
sys.modules["resource"] = None
import importlib, pkgutil, studio
for mod in pkgutil.walk_packages(studio.__path__, "studio."):
    if not mod.name.endswith("__main__"):  # importing those runs a CLI
        importlib.import_module(mod.name)
from studio import compat, paths, runs
assert compat.fcntl is None
paths.set_data_dir(sys.argv[1])
import app
app._close_on_sigterm()
run = runs.new_run_dir("smoke")
runs.mark_live(run)
assert runs.is_live(run)
child = ("import sys; sys.modules['fcntl'] = None; from studio import runs;"
         " print(runs.is_live(sys.argv[1]))")
import subprocess
seen = subprocess.run([sys.executable, "-c", child, str(run)], capture_output=True, text=True,
                      encoding="utf-8", cwd=sys.argv[2]).stdout.strip()
assert seen == "True", seen  # another process sees the run live: the lock names this one
runs.mark_done(run)
print("ok")
"""


def test_the_studio_runs_without_windows_missing_posix_calls(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_POSIX, str(tmp_path), str(ROOT)],
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# --------------------------------------------------------------------------- a cp1252 console


def _cp1252(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a CLI as a redirected Windows console would; it must also open no file of its own
    without an encoding (conftest sets PYTHONWARNDEFAULTENCODING for child processes)."""
    env = {**os.environ, "PYTHONIOENCODING": "cp1252:strict", "PYTHONWARNDEFAULTENCODING": "1"}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, timeout=600
    )
    err = done.stderr.decode("cp1252", errors="replace").splitlines()
    ours = [line for line in err if "EncodingWarning" in line and str(ROOT / "studio") in line]
    assert not ours, ours
    return done


def test_the_train_cli_prints_a_vietnamese_run_on_a_cp1252_console(
    tmp_path: Path, sample_dataset_path: Path
) -> None:
    """The run folder is printed to stdout before the model loads (here it is missing, so
    the run then fails fast: the model is not what this test is about)."""
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run_name: {VIETNAMESE}\nbase_model: {tmp_path / 'no-model'}\n"
        f"dataset_path: {sample_dataset_path}\nallow_pii: true\ndevice: cpu\n",
        encoding="utf-8",
    )
    done = _cp1252(["-m", "studio.train", str(config), "--data-dir", str(tmp_path)], tmp_path)
    out, err = done.stdout.decode("cp1252"), done.stderr.decode("cp1252")
    assert "UnicodeEncodeError" not in err, err
    assert "Run folder:" in out and "th\\u1eed-nghi\\u1ec7m" in out  # escaped, not a crash
    assert "could not find model" in (out + err).lower()


@pytest.mark.slow
def test_the_doctor_prints_on_a_cp1252_console(tmp_path: Path) -> None:
    home = tmp_path / VIETNAMESE
    done = _cp1252(["-m", "studio.doctor", "--data-dir", str(home)], tmp_path)
    out = done.stdout.decode("cp1252") + done.stderr.decode("cp1252")
    assert "UnicodeEncodeError" not in out and "Sysmem fallback" in out, out
    assert "th\\u1eed-nghi\\u1ec7m" in out  # the data dir, in the disk check


def test_no_open_without_an_encoding_in_the_studio() -> None:
    """ruff's PLW1514 (pyproject's lint selection) as a test, so CI runs it too."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (tests/requirements.txt installs it)")
    done = subprocess.run(
        [ruff, "check", "--preview", "--select", "PLW1514", "studio", "app.py"],
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout


# --------------------------------------------------------------------------- GPUs on Windows


def test_use_all_gpus_is_hidden_and_refused_without_nccl(monkeypatch) -> None:
    from studio.hardware import detect
    from studio.train import distributed

    monkeypatch.delenv(distributed.CPU_PROCESSES_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    two = [{"name": "RTX 3090", "memory_bytes": 24 << 30, "driver": "572.16"}] * 2
    monkeypatch.setattr(detect, "nvidia_smi", lambda: two)  # two cards in the PC
    monkeypatch.setattr(compat, "IS_WINDOWS", True)
    assert not compat.nccl_available()
    assert distributed.offered_processes() == 1
    with pytest.raises(RuntimeError, match="WSL 2"):
        distributed.launch_command(["run.yaml"], 2)

    from studio.ui.app import build_app

    demo = build_app()
    box = next(b for b in demo.blocks.values() if b.elem_id == "train-all-gpus")
    assert box.visible is False


def test_the_estimate_does_not_claim_paged_states_spill_on_windows(monkeypatch) -> None:
    from studio.hardware import vram

    shape = vram.model_shape("HuggingFaceTB/SmolLM2-135M-Instruct")
    settings = {"method": "qlora", "optimizer": "paged_adamw_8bit", "max_seq_len": 256}
    linux = " ".join(vram.estimate(shape, settings).notes)
    monkeypatch.setattr(compat, "IS_WINDOWS", True)
    windows = " ".join(vram.estimate(shape, settings).notes)
    assert "spill to RAM" in linux and "Sysmem" not in linux
    assert "spill to RAM" not in windows and "does not page on Windows" in windows
    assert "Prefer No Sysmem Fallback" in windows  # the Hardware verdict's notes


def _train_entry(step: int, tokens_per_s: float, peak_mb: float) -> dict:
    return {
        "kind": "train", "step": step, "total_steps": 100, "loss": 1.0, "learning_rate": 1e-4,
        "tokens_per_s": tokens_per_s, "peak_memory_mb": peak_mb,
        "memory_kind": "GPU peak allocated", "eta_s": 10.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("rates", "peaks", "warned"),
    [
        ([900, 950, 930], [7000, 7100, 7100], False),  # fits: no warning
        ([900, 950, 930], [7000, 8500, 12600], True),  # peak past the 12 GiB card
        ([900, 950, 60], [7000, 7100, 7100], True),  # 15x slower all at once
    ],
)
def test_the_train_tab_warns_of_the_drivers_sysmem_fallback(
    monkeypatch, rates, peaks, warned
) -> None:
    from studio.hardware import fallback
    from studio.train.jobs import JobSnapshot
    from studio.ui.train_tab import progress_markdown

    history = [_train_entry(i + 1, r, p) for i, (r, p) in enumerate(zip(rates, peaks, strict=True))]
    snap = JobSnapshot(state="running", step=3, total_steps=100, history=history)
    monkeypatch.setattr(fallback, "card_total_mb", lambda index=0: 12288.0)  # a 12 GB card
    assert "Sysmem" not in progress_markdown(snap)  # Linux: the driver raises out-of-memory
    monkeypatch.setattr(compat, "IS_WINDOWS", True)
    shown = progress_markdown(snap)
    assert ('"Prefer No Sysmem Fallback"' in shown) is warned, shown


def test_the_doctor_says_where_to_check_the_sysmem_fallback_setting(monkeypatch) -> None:
    from studio.hardware import detect, doctor

    card = [{"name": "RTX 4070", "memory_bytes": 12 << 30, "driver": "572.16"}]
    monkeypatch.setattr(detect, "nvidia_smi", lambda: card)
    assert doctor.check_sysmem_fallback().status == doctor.OK  # not Windows
    monkeypatch.setattr(compat, "IS_WINDOWS", True)
    check = doctor.check_sysmem_fallback()
    assert check.status == doctor.WARNING and "CUDA - Sysmem Fallback Policy" in check.fix
    card[0]["driver"] = "531.79"  # before 536.40: no fallback
    assert doctor.check_sysmem_fallback().status == doctor.OK


# --------------------------------------------------------------------------- files for Excel


def test_batch_compare_csv_opens_in_excel_with_vietnamese_and_thai(tmp_path: Path) -> None:
    from studio.chat import evaluate

    row = {"prompt": "Xin chào, tôi cần đổi đơn hàng", "base": "สวัสดีครับ", "fine_tuned": "Dạ"}
    path = evaluate.write_csv([row], tmp_path)
    data = path.read_bytes()
    assert data.startswith(codecs.BOM_UTF8)  # Excel reads a CSV without it as cp1252
    assert "tôi cần đổi" in data.decode("utf-8-sig") and "สวัสดีครับ" in data.decode("utf-8-sig")


def test_console_safe_turns_a_crash_into_escapes(tmp_path: Path) -> None:
    code = "from studio import compat; compat.console_safe(); print('Nguyễn ก')"
    env = {**os.environ, "PYTHONIOENCODING": "cp1252:strict"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode("cp1252").strip() == "Nguy\\u1ec5n \\u0e01"


def test_rank_processes_get_utf8_pipes_and_files() -> None:
    env = compat.utf8_child_env({"PATH": "x"})
    code = "import sys, locale; print(sys.stdout.encoding, locale.getpreferredencoding(False))"
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, timeout=60
    )
    assert done.stdout.decode().split() == ["utf-8", "utf-8"]


def test_process_started_tells_processes_apart(other_process) -> None:
    mine, theirs = compat.process_started(), compat.process_started(other_process.pid)
    assert mine is not None and theirs is not None
    assert compat.process_alive(other_process.pid, theirs)
    assert not compat.process_alive(other_process.pid, theirs - 10)
    other_process.kill()
    other_process.wait()
    time.sleep(0.1)
    assert not compat.process_alive(other_process.pid, theirs)
