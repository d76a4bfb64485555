"""CUDA decisions tested without a GPU: faked device counts, free memory and Triton.

Each test fakes only what a machine would report (torch.cuda's answers, free bytes, whether
Triton imports) and runs the studio's real decision code, and where it is involved the real
transformers/TRL code it feeds (TrainingArguments' device setup).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import trl  # noqa: F401  (imported before torch.cuda is faked: its import checks the machine)
from trl import SFTConfig  # noqa: F401

from studio import gpu
from studio.config import ConfigError, RunConfig
from studio.export.gguf import plan_verify
from studio.hardware import detect, doctor, vram
from studio.hardware.detect import GpuInfo
from studio.train import recipe

GIB = 2**30


@pytest.fixture
def two_gpus(monkeypatch) -> list:
    """A PC with two Ampere cards as torch.cuda would report it; set_device calls recorded."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=0: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=0: f"RTX 3090 #{idx}")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return calls


# --- defect 4: two GPUs ---------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1])
def test_a_run_on_a_two_gpu_pc_uses_one_card_the_chosen_one(two_gpus, tmp_path, index) -> None:
    # TrainingArguments alone counts both cards (n_gpu 2): the Trainer would then wrap the
    # model that device_map put on one card in DataParallel, and SFTTrainer fails at start.
    cfg = RunConfig(gpu_index=index)
    args = recipe.build_training_args(cfg, tmp_path, "cuda", has_eval=False, resume=False)
    assert args.n_gpu == 1
    assert str(args.parallel_mode) == "ParallelMode.NOT_PARALLEL"
    assert args.device == torch.device("cuda", index)
    assert gpu.card(cfg.gpu_index, "cuda") == f"cuda:{index}"
    if index:
        assert two_gpus[-1] == index  # the thread's current card, which accelerate's "cuda" means


def test_gpu_index_is_checked_against_the_cards_found(two_gpus) -> None:
    from studio.train.prepare import resolve_device

    assert resolve_device(RunConfig(gpu_index=1))[1] == "cuda: GPU 1, RTX 3090 #1"
    with pytest.raises(ConfigError, match="gpu_index"):
        resolve_device(RunConfig(gpu_index=2))
    with pytest.raises(ConfigError, match="gpu_index"):
        RunConfig(gpu_index=-1).validate()


def test_the_hardware_tab_offers_each_detected_card() -> None:
    from studio.ui.hardware_tab import gpu_choices

    gpus = [GpuInfo(0, "RTX 3060", 12 * GIB, (8, 6)), GpuInfo(1, "RTX 4090", 24 * GIB, (8, 9))]
    report = {"gpus": [{**vars(g), "index": g.index} for g in gpus]}
    assert gpu_choices(report) == [
        ("GPU 0: RTX 3060, 12.0 GiB", 0),
        ("GPU 1: RTX 4090, 24.0 GiB", 1),
    ]


def test_the_picked_card_reaches_the_run_config() -> None:
    from studio.ui.train_tab import FIELDS, config_from_ui

    values = {name: getattr(RunConfig(), name) for name in FIELDS}
    assert config_from_ui(values, {"hardware.gpu": 1}).gpu_index == 1
    assert config_from_ui(values, {}).gpu_index == 0  # one card: no picker


# --- defect 5: where the GGUF is verified ---------------------------------------------------


def test_gguf_verify_goes_to_the_gpu_in_its_dtype_when_it_fits() -> None:
    plan = plan_verify(8 * 10**9, gpu_free=22 * GIB, gpu_dtype="bfloat16", ram_free=16 * GIB)
    assert (plan.device, plan.dtype) == ("cuda", "bfloat16")


def test_gguf_verify_never_asks_30_gib_of_ram_for_an_8b_model() -> None:
    # 12 GB card (too small for 16 GB of bf16 weights), 24 GiB free RAM: bf16 on the CPU.
    plan = plan_verify(8 * 10**9, gpu_free=11 * GIB, gpu_dtype="bfloat16", ram_free=24 * GIB)
    assert (plan.device, plan.dtype) == ("cpu", "bfloat16")
    assert "float32 would need 29.8 GiB" in plan.reason
    # 16 GiB free: not even bf16 fits; skipped, and the reason says so
    plan = plan_verify(8 * 10**9, gpu_free=None, gpu_dtype=None, ram_free=16 * GIB)
    assert plan.device is None and "not checked" in plan.reason and "16.0 GiB" in plan.reason


def test_a_small_gguf_is_still_checked_exactly_on_the_cpu() -> None:
    plan = plan_verify(135 * 10**6, gpu_free=None, gpu_dtype=None, ram_free=8 * GIB)
    assert (plan.device, plan.dtype) == ("cpu", "float32")


# --- defect 7: CUDA without Triton ----------------------------------------------------------


# A stand-in for the probe's child: what Triton prints on a Python built without its headers.
_NO_HEADERS = (
    "import sys; sys.stderr.write('/tmp/x/main.c:5:10: fatal error: Python.h: No such file or"
    " directory\\nsubprocess.CalledProcessError: gcc returned 1\\n'); sys.exit(1)"
)


@pytest.fixture
def triton_installed(monkeypatch, tmp_path) -> list:
    """Triton 3.5 installed with a C compiler on PATH; the probe's child is a stand-in that
    records each start. Tests set `probe_code` to what the child does."""
    from studio.hardware import triton_probe

    starts: list = []
    monkeypatch.setattr(triton_probe, "triton_version", lambda: "3.5.0")
    monkeypatch.setattr(triton_probe, "_memory", {})
    monkeypatch.setattr(triton_probe, "_cache_path", lambda: tmp_path / triton_probe.CACHE_FILE)
    monkeypatch.setattr(detect, "c_compiler", lambda: "/usr/bin/gcc")
    monkeypatch.setattr("transformers.utils.is_triton_available", lambda: True)
    code = {"probe_code": _NO_HEADERS}

    def command() -> list[str]:
        starts.append(1)
        return [sys.executable, "-c", code["probe_code"]]

    monkeypatch.setattr(triton_probe, "probe_command", command)
    starts.append(code)
    return starts


def test_triton_that_cannot_compile_is_not_ready_and_the_verdict_is_kept(triton_installed):
    """Issue 25, item 1: a C compiler is not enough; without Python.h the kernel build fails."""
    from studio.hardware import triton_probe

    code = triton_installed.pop(0)
    ready = detect.triton_ready()
    assert ready.value is False
    assert "Python.h" in ready.reason and "compact loss head" in ready.reason
    assert "-dev" in ready.reason  # what to install
    assert len(triton_installed) == 1
    code["probe_code"] = "print('ok')"  # the next app start: memory empty, cache on disk
    triton_probe._memory.clear()
    assert detect.triton_ready().value is False and len(triton_installed) == 1
    assert detect.triton_ready(fresh=True).value is True  # the doctor probes afresh
    assert len(triton_installed) == 2 and detect.triton_ready().value is True


def test_the_hardware_tab_never_waits_for_a_triton_compile(triton_installed) -> None:
    triton_installed[0]["probe_code"] = "print('ok')"
    unprobed = detect.triton_ready(probe=False)
    assert unprobed.value is False and "not probed yet" in unprobed.reason
    assert len(triton_installed) == 1  # no child started
    assert detect.triton_ready().value is True  # a run probes; then the tab reads the verdict
    assert detect.triton_ready(probe=False).value is True and len(triton_installed) == 2


def test_a_crashing_triton_probe_leaves_the_app_running(triton_installed) -> None:
    triton_installed[0]["probe_code"] = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    ready = detect.triton_ready()
    assert ready.value is False and "crashed" in ready.reason


def test_without_triton_or_a_compiler_the_answer_is_fast_and_probes_nothing(monkeypatch):
    from studio.hardware import triton_probe

    monkeypatch.setattr(triton_probe, "probe_command", lambda: pytest.fail("probed"))
    monkeypatch.setattr(triton_probe, "triton_version", lambda: None)
    assert "no Triton" in detect.triton_ready().reason
    monkeypatch.setattr(triton_probe, "triton_version", lambda: "3.5.0")
    monkeypatch.setattr(detect, "c_compiler", lambda: None)
    if sys.platform.startswith("linux"):
        assert "install gcc" in detect.triton_ready().reason


def test_cuda_falls_back_to_the_compact_head_when_the_probe_fails(triton_installed) -> None:
    model = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=None))
    assert recipe.compact_head_ok(model, "cuda") is True


@pytest.mark.parametrize(("triton", "compact"), [(False, True), (True, False)])
def test_cuda_uses_the_compact_head_exactly_when_triton_is_missing(
    monkeypatch, triton, compact
) -> None:
    monkeypatch.setattr(detect, "triton_ready", lambda **_: detect.Choice(triton, "faked"))
    model = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=None))
    assert recipe.compact_head_ok(model, "cuda") is compact
    assert recipe.compact_head_ok(model, "cpu") is True
    capped = SimpleNamespace(config=SimpleNamespace(final_logit_softcapping=30.0))
    assert recipe.compact_head_ok(capped, "cuda") is False  # TRL's head knows the cap


def test_the_estimate_counts_the_compact_head_on_cuda() -> None:
    shape = vram.model_shape("Qwen/Qwen2.5-7B-Instruct")
    settings = {"method": "qlora", "batch_size": 1, "max_seq_len": 1024}
    settings["gradient_checkpointing"] = True  # the head, not a layer, sets the peak
    fused = vram.estimate(shape, settings, device="cuda")
    compact = vram.estimate(shape, settings, device="cuda", compact_head=True)
    full = vram.estimate(shape, settings, device="cuda", fused_lm_head=False)
    assert "compact" in next(p.detail for p in compact.parts if p.key == "logits")
    # pieces of 32 Mi logits with their fp32 copies: more than Triton's in-place tiles,
    # far less than the 8192 x 152k logits
    assert fused.part("logits") < compact.part("logits") < full.part("logits") / 4


def test_doctor_triton_check_without_gpu_and_without_triton(monkeypatch) -> None:
    assert doctor.check_triton().status == doctor.OK  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(detect, "triton_ready", lambda fresh: detect.Choice(False, "no Triton"))
    found = doctor.check_triton()
    assert found.status == doctor.WARNING and found.detail == "no Triton"


def test_the_doctor_reports_the_probes_result(monkeypatch, triton_installed) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    found = doctor.check_triton()
    assert found.status == doctor.WARNING
    assert "Python.h" in found.detail and "compact loss head" in found.detail
    assert "python3-dev" in found.fix


# --- defect 9: estimate vs measured ---------------------------------------------------------


def test_the_apps_own_cuda_memory_is_not_counted_as_in_use() -> None:
    # the estimate adds the CUDA context a run needs; the app's own context (the run happens
    # in this process) must not be counted again as "in use by other programs"
    gpu = GpuInfo(0, "RTX 4070", 12 * GIB, (8, 9), free_bytes=10 * GIB, own_bytes=GIB // 2)
    assert gpu.used_bytes == 3 * GIB // 2
    raw = detect.HardwareReport(
        *(detect.Choice("", "") for _ in range(3)), [gpu], 0, 0, 1, 0, 0
    ).to_dict()["gpus"][0]
    assert raw["used_bytes"] == 3 * GIB // 2  # what the Hardware tab's estimate reads


def test_run_metadata_records_the_estimate_and_the_measured_peak(tmp_path: Path) -> None:
    record = vram.run_estimate("Qwen/Qwen2.5-0.5B-Instruct", RunConfig(), "cuda", False)
    assert record["estimate_bytes"] > record["estimate_allocated_bytes"] > 0
    assert vram.measured_peak("cpu")["measured_rss_bytes"] > 0
    missing = vram.run_estimate(str(tmp_path / "nothing"), RunConfig(), "cpu", True)
    assert missing["estimate_bytes"] is None and missing["why"]


@pytest.mark.slow
def test_mfu_counts_a_4bit_model_at_its_real_size(embedded_model) -> None:
    """A QLoRA model's packed 4-bit weights count half in numel(); MFU must not."""
    import torch

    from studio.models.loader import load_model, logical_params

    full = load_model(embedded_model.path, dtype=torch.float32)
    nf4 = load_model(embedded_model.path, dtype=torch.float32, four_bit=True)
    packed = sum(p.numel() for p in nf4.parameters())
    assert packed < 0.75 * logical_params(full)  # what the old count saw
    assert logical_params(nf4) == logical_params(full)


def test_qlora_on_the_second_card_passes_accelerates_4bit_device_check(two_gpus, tmp_path) -> None:
    """accelerate refuses a 4-bit model that sits on another card than its own device; the
    Trainer's Accelerator must mean cuda:1 when the run trains there (issue 25, item 2)."""
    from accelerate import Accelerator

    recipe.build_training_args(RunConfig(gpu_index=1), tmp_path, "cuda", False, False)
    accelerator = Accelerator()  # as Trainer builds it, after the arguments
    assert accelerator.device == torch.device("cuda", 1)
    model = torch.nn.Linear(2, 2)
    model.is_loaded_in_4bit = True  # what a bitsandbytes load marks, on the card it chose
    model.hf_device_map = {"": 1}
    try:
        accelerator.prepare_model(model, device_placement=False)  # raised ValueError before
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)  # no faked card for others


# --- issue 25, item 3: export while a GPU run trains -----------------------------------------


@pytest.fixture
def gpu_run_training(monkeypatch, studio_home: Path):
    """A 40 GiB-free card, and a run folder held by a live training process on it."""
    from studio import runs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (40 * GIB, 48 * GIB))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    run = runs.new_run_dir("export-guard")
    meta = {"status": "running", "base_model": {"name": "x"}, "device": {"used": "cuda"}}
    runs.write_metadata(run, meta)
    runs.mark_live(run)
    yield run
    runs.mark_done(run)
    runs.write_metadata(run, {**meta, "status": "failed"})


def test_export_merges_on_the_cpu_while_a_gpu_run_trains(gpu_run_training, tmp_path) -> None:
    from studio import runs
    from studio.export import merge

    (tmp_path / "config.json").write_text('{"dtype": "bfloat16"}', encoding="utf-8")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 2 * 10**6)  # 1M parameters
    device, dtype, reason = merge.choose_precision(tmp_path)
    assert (device, dtype) == ("cpu", "float32")
    assert "a training run is using the GPU" in reason  # says which, and why
    runs.mark_done(gpu_run_training)
    runs.write_metadata(gpu_run_training, {"status": "completed", "device": {"used": "cuda"}})
    assert merge.choose_precision(tmp_path)[0] == "cuda"  # the card is free again


def test_the_gguf_check_stays_off_the_gpu_while_a_gpu_run_trains(
    gpu_run_training, monkeypatch
) -> None:
    from studio.export import gguf

    monkeypatch.setattr(gguf, "gguf_params", lambda _file: 135 * 10**6)
    plan = gguf.verify_plan(Path("model.gguf"))
    assert plan.device == "cpu" and "a training run is using the GPU" in plan.reason


# --- issue 25, item 4: a multi-GPU start that must download -----------------------------------


def test_a_launched_run_fetches_its_base_before_any_process_starts(
    studio_home, monkeypatch, tmp_path
) -> None:
    """Rank 0 used to download while the other ranks waited under NCCL's 10-minute timeout;
    the app now fetches first, and a model it cannot fetch is refused with no process started."""
    from studio.train import distributed, jobs

    started: list = []
    monkeypatch.setenv(distributed.CPU_PROCESSES_ENV, "2")
    monkeypatch.setattr(distributed, "launch_command", lambda args, n: started.append(args))
    data = tmp_path / "rows.jsonl"
    row = {
        "messages": [
            {"role": "user", "content": "xin chào"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    data.write_text("\n".join([json.dumps(row, ensure_ascii=False)] * 8), encoding="utf-8")
    cfg = RunConfig(base_model="nobody/no-such-model-xyz", dataset_path=str(data), device="cpu")
    with pytest.raises(ConfigError, match="could not fetch 'nobody/no-such-model-xyz'"):
        jobs.JobManager().start(cfg, processes=2)
    assert started == []  # refused before `accelerate launch`
    assert distributed.PREPARE_WAIT_S > 10 * 60  # the ranks wait longer than NCCL's default


# --- issue 25, item 5: pre-quantized bases in export ------------------------------------------

_BNB = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def _prequantized_run(root: Path, base_name: str) -> Path:
    """A finished run whose base, recorded on disk, is stored in 4-bit (its config.json)."""
    base = root / "base-4bit"
    base.mkdir(parents=True)
    config = {"model_type": "llama", "quantization_config": _BNB}
    (base / "config.json").write_text(json.dumps(config), encoding="utf-8")
    run = root / "prequant-20250101-000000"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    meta = {
        "status": "completed",
        "base_model": {"name": base_name, "path": str(base)},
        "settings": {"method": "qlora"},
    }
    (run / "training_metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    return run


def test_export_of_a_bnb_4bit_base_refuses_before_any_work_when_the_original_is_missing(
    tmp_path, studio_home
) -> None:
    from studio.export import run as export

    run = _prequantized_run(tmp_path, "unsloth/Nothing-7B-Instruct-bnb-4bit")  # not catalogued
    with pytest.raises(export.ExportError, match="does not know which model it was made from"):
        export.export_run(run, gguf="none")
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "training_metadata.json"]
    run2 = _prequantized_run(tmp_path / "b", str(tmp_path / "my-own-4bit"))
    with pytest.raises(export.ExportError, match="Train on the 16-bit original"):
        export.export_run(run2, gguf="none")


def test_export_merges_a_bnb_4bit_run_onto_its_16_bit_original(tmp_path, embedded_model) -> None:
    from studio.export import prequant
    from studio.export.run import inspect_run, resolve_base
    from studio.models import catalog

    name = "HuggingFaceTB/SmolLM2-135M-Instruct-bnb-4bit"
    src = inspect_run(_prequantized_run(tmp_path, name))
    base = prequant.merge_base(src, resolve_base(src))
    assert base.path == embedded_model.path  # the original, here the embedded copy
    assert prequant.notes(src, base) == [
        f"{name} is stored quantized: the adapter was merged into {embedded_model.name}"
    ]
    assert catalog.quantization_of(embedded_model.path) is None
    assert prequant.merge_base(src, embedded_model) is embedded_model  # plain weights: as is


# --- issue 25, item 11: smaller points ---------------------------------------------------------

_BROKEN_SMI = """#!/bin/sh
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure\
 that the latest NVIDIA driver is installed and running."
exit 9
"""


def test_the_doctor_says_nvidia_smi_failed_and_why_when_it_exists(tmp_path, monkeypatch):
    exe = tmp_path / "nvidia-smi"
    exe.write_text(_BROKEN_SMI, encoding="utf-8")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    found = doctor.check_driver()
    assert found.status == doctor.PROBLEM
    assert found.detail.startswith("nvidia-smi failed: NVIDIA-SMI has failed because")
    assert "missing" not in found.detail
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert detect.nvidia_smi_problem() == "nvidia-smi missing"


def test_run_metadata_describes_the_card_that_trains(two_gpus, monkeypatch) -> None:
    from studio.train.prepare import hardware_info

    cards = {0: ("RTX 3060", 12, (8, 6)), 1: ("RTX 2080 Ti", 11, (7, 5))}
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: SimpleNamespace(
            name=cards[i][0], total_memory=cards[i][1] * GIB, major=cards[i][2][0],
            minor=cards[i][2][1],
        ),
    )  # fmt: skip
    info = hardware_info("cuda", gpu_index=1)
    assert (info["gpu"], info["gpu_index"], info["gpu_memory_gib"]) == ("RTX 2080 Ti", 1, 11.0)
    assert info["native_bf16"] is False  # Turing: the card's own answer, not GPU 0's
    assert hardware_info("cuda", gpu_index=0)["gpu"] == "RTX 3060"


# --- issue 25, item 9: the self-test trains in the presets' recipe -----------------------------


def test_the_selftest_trains_with_the_presets_optimizer_and_checkpointing(monkeypatch):
    from studio.hardware.presets import load_presets
    from studio.tools import selftest

    gpu_band = load_presets().get("rtx3060-12gb").bands["up_to_1b"]
    cfg = selftest.selftest_config(Path("/tmp/m"), "qlora", "cuda", 3)
    assert cfg.optimizer == gpu_band.optimizer == "paged_adamw_8bit"
    assert cfg.gradient_checkpointing is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert selftest.selftest_config(Path("/tmp/m"), "lora", "auto", 3).optimizer == (
        "paged_adamw_8bit"
    )
    cpu = selftest.selftest_config(Path("/tmp/m"), "lora", "cpu", 3)
    assert cpu.optimizer == "adamw_torch" and cpu.gradient_checkpointing is True


# --- issue 25, item 8: memory given back, and a fatal CUDA error ---------------------------------


def test_paged_optimizer_buffers_do_not_outlive_their_run() -> None:
    """bitsandbytes keeps every paged optimizer buffer in a process-wide list; after a run
    the studio empties it, so the buffers (GPU-mapped memory on a card) can be freed."""
    import gc
    import weakref

    from bitsandbytes.functional import GlobalPageManager

    from studio.train import memory

    buffer = torch.zeros(16)
    GlobalPageManager.get_instance().paged_tensors.append(buffer)  # as a paged optimizer does
    gone = weakref.ref(buffer)
    del buffer
    gc.collect()
    assert gone() is not None  # the run is over, yet the manager still holds it
    record = memory.after_run("cpu", None)
    assert gone() is None and record["paged_buffers_released"] >= 1
    assert {"app_gpu_before_run", "app_gpu_after_run"} <= set(record)


def test_a_fatal_cuda_error_says_restart_and_blocks_the_next_gpu_use(
    monkeypatch, tmp_path, studio_home
) -> None:
    from studio import runs
    from studio.chat import engine as chat
    from studio.train import jobs, loop, memory
    from studio.train.prepare import prepare_run

    monkeypatch.setattr(memory, "_fatal", None)

    def kernel_fault(*_args, **_kwargs):  # what torch raises after a bad kernel
        raise RuntimeError(
            "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be"
            " asynchronously reported at some other API call"
        )

    monkeypatch.setattr(loop.recipe, "load_base_model", kernel_fault)
    data = tmp_path / "rows.jsonl"
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"}]}
    data.write_text("\n".join([json.dumps(row)] * 8), encoding="utf-8")
    run = prepare_run(RunConfig(dataset_path=str(data), device="cpu", max_steps=1))
    result = jobs.execute_run(run)
    assert result.status == "failed" and "restart the studio" in result.message
    assert any("restart the studio" in line for line in result.advice)
    meta = runs.read_metadata(run.run_dir)
    assert "app_gpu_after_run" in meta["memory"]  # both figures recorded, whatever the end
    with pytest.raises(ConfigError, match="restart the studio"):
        memory.refuse_if_broken("cuda")
    memory.refuse_if_broken("cpu")  # the CPU is not affected
    key = SimpleNamespace(device="cuda", path=Path("x"), four_bit=False)
    with pytest.raises(chat.ChatError, match="restart the studio"):
        chat.ChatEngine()._load_fresh_base(key, "x", lambda *_: None)


# --- issue 25, item 7: fp16 only when the activations fit too ------------------------------------


def test_a_merged_model_whose_activations_overflow_fp16_is_saved_in_bf16() -> None:
    """Weights within float16's range, activations beyond it (as Gemma's): bfloat16 is kept,
    and the reason says so. A model over 1B is faked by its parameter count only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from studio.export import merge

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    prompts = [[1, 5, 9, 13, 40], [2, 60, 61]]
    calm = merge.save_dtype_for(model, prompts, params=2 * 10**9)
    assert calm.dtype == "float16" and "within float16's range" in calm.reason
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                proj.weight.mul_(4000.0 / proj.weight.abs().max())  # every |w| <= 4000
    assert max(float(p.abs().max()) for p in model.parameters()) <= merge.FP16_SAFE_MAX
    half = LlamaForCausalLM(config).eval()
    half.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = half.half()(input_ids=torch.tensor([prompts[0]])).logits
    assert not torch.isfinite(logits).all()  # the premise: fp16 really breaks this model
    hot = merge.save_dtype_for(model, prompts, params=2 * 10**9)
    assert hot.dtype == "bfloat16", hot
    assert "activation" in hot.reason and "beyond float16's limit" in hot.reason
    small = merge.save_dtype_for(model, prompts)  # under 1B: float32, nothing to check
    assert small.dtype == "float32"


def test_the_hardware_estimate_measures_the_card_picked_to_train() -> None:
    """GPU 1 (a busy 24 GB card) trains: its free memory and its preset set the estimate,
    not GPU 0's."""
    from studio.hardware.presets import load_presets
    from studio.ui.hardware_tab import _memory_target, estimate_view

    gpus = [
        GpuInfo(0, "NVIDIA GeForce RTX 3060", 12 * GIB, (8, 6), free_bytes=11 * GIB),
        GpuInfo(1, "NVIDIA GeForce RTX 4090", 24 * GIB, (8, 9), free_bytes=4 * GIB),
    ]
    report = detect.HardwareReport(
        detect.Choice("cuda", ""), detect.Choice("bf16", ""),
        detect.Choice("rtx3060-12gb", ""), gpus, 0, 0, 1, 12 * GIB, 0,
    ).to_dict()  # fmt: skip
    catalog = load_presets()
    picked = detect.closest_preset(catalog, gpus[1].name, gpus[1].total_bytes).value
    capacity, in_use, how, _ = _memory_target(picked, catalog, report, gpu_index=1)
    assert (capacity, in_use, how) == (24 * GIB, 20 * GIB, "measured on your card")
    settings = {"method": "lora", "batch_size": 1, "max_seq_len": 512, "gpu_index": 1}
    text, _fig = estimate_view(picked, "HuggingFaceTB/SmolLM2-135M-Instruct", settings, report)
    assert "measured on your card" in text
