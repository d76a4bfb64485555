"""GPU detection and preset choice (each with its reason) and the environment check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from studio.hardware import detect as hardware
from studio.hardware import doctor
from studio.hardware.presets import load_presets
from studio.models import precision

GIB = 1024**3


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory):
    return load_presets(user_dir=tmp_path_factory.mktemp("no-user-presets"))


@pytest.mark.parametrize(
    ("name", "gib", "preset", "why"),
    [
        ("NVIDIA GeForce RTX 3060", 11.99, "rtx3060-12gb", "matches 'RTX 3060'"),
        ("NVIDIA GeForce RTX 4070 SUPER", 11.99, "rtx4070-12gb", "matches 'RTX 4070'"),
        ("NVIDIA GeForce RTX 4060 Ti", 15.99, "rtx4060ti-16gb", "matches 'RTX 4060 Ti'"),
        ("NVIDIA GeForce RTX 4060", 7.99, "rtx4060-8gb", "matches 'RTX 4060'"),
        ("NVIDIA GeForce RTX 4090", 23.99, "rtx4090-24gb", "matches 'RTX 4090'"),
        # Same name, different memory: the memory decides, and the reason says so.
        ("NVIDIA GeForce RTX 4060 Ti", 7.99, "rtx4060-8gb", "has 8.0 GiB, not 16"),
        ("NVIDIA GeForce RTX 3060 Ti", 7.99, "rtx4060-8gb", "closest by memory"),
        ("NVIDIA RTX A4000", 15.99, "rtx4060ti-16gb", "no preset names 'NVIDIA RTX A4000'"),
        ("NVIDIA A100-SXM4-80GB", 79.3, "rtx5090-32gb", "closest by memory"),
        # Two presets share "RTX 3080": the memory picks the 10 or the 12 GB one.
        ("NVIDIA GeForce RTX 3080", 9.77, "rtx3080-10gb", "matches 'RTX 3080'"),
        ("NVIDIA GeForce RTX 3080", 11.76, "rtx3080-12gb", "matches 'RTX 3080'"),
        ("NVIDIA GeForce RTX 3080 Ti", 11.76, "rtx3080-12gb", "matches 'RTX 3080'"),
        ("NVIDIA GeForce RTX 3070 Ti", 7.77, "rtx3070-8gb", "matches 'RTX 3070'"),
        ("NVIDIA GeForce RTX 5060 Ti", 15.48, "rtx5060ti-16gb", "matches 'RTX 5060 Ti'"),
        ("NVIDIA GeForce RTX 5070", 11.49, "rtx5070-12gb", "matches 'RTX 5070'"),
        ("NVIDIA GeForce RTX 5070 Ti", 15.47, "rtx5070ti-16gb", "matches 'RTX 5070 Ti'"),
        ("NVIDIA GeForce RTX 5080", 15.47, "rtx5080-16gb", "matches 'RTX 5080'"),
        ("NVIDIA GeForce RTX 5090", 31.36, "rtx5090-32gb", "matches 'RTX 5090'"),
        # An 8 GB 5060 Ti: the least power-hungry 8 GB preset, whatever the file order.
        ("NVIDIA GeForce RTX 5060 Ti", 7.6, "rtx4060-8gb", "has 7.6 GiB, not 16"),
        ("NVIDIA GeForce RTX 3050 Laptop GPU", 4.0, "rtx4060-8gb", "less than any preset"),
    ],
)
def test_closest_preset_with_reason(catalog, name: str, gib: float, preset: str, why: str) -> None:
    choice = hardware.closest_preset(catalog, name, int(gib * GIB))
    assert choice.value == preset
    assert why in choice.reason


def test_no_gpu_means_the_cpu_preset(catalog) -> None:
    choice = hardware.closest_preset(catalog, None, None)
    assert choice.value == "cpu" and "no CUDA GPU" in choice.reason


def test_parse_nvidia_smi() -> None:
    text = "NVIDIA GeForce RTX 3060, 12288, 550.54.14\nNVIDIA GeForce RTX 4090, 24564, 550.54.14\n"
    rows = hardware.parse_nvidia_smi(text)
    assert rows == [
        {"name": "NVIDIA GeForce RTX 3060", "memory_bytes": 12288 * 1024**2, "driver": "550.54.14"},
        {"name": "NVIDIA GeForce RTX 4090", "memory_bytes": 24564 * 1024**2, "driver": "550.54.14"},
    ]
    assert hardware.parse_nvidia_smi("") == []


def test_nvidia_cards_found_on_the_pci_bus(tmp_path: Path) -> None:
    """A card with no driver still shows on the bus: vendor 0x10de, display class 0x03."""
    for name, vendor, klass in [
        ("0000:01:00.0", "0x10de", "0x030000"),  # NVIDIA VGA controller
        ("0000:01:00.1", "0x10de", "0x040300"),  # its HDMI audio function
        ("0000:00:02.0", "0x8086", "0x030000"),  # integrated Intel graphics
    ]:
        dev = tmp_path / name
        dev.mkdir()
        (dev / "vendor").write_text(vendor + "\n")
        (dev / "class").write_text(klass + "\n")
    assert hardware.nvidia_pci_devices(tmp_path) == 1
    assert hardware.nvidia_pci_devices(tmp_path / "missing") == 0


def test_detect_on_this_machine(catalog) -> None:
    import torch

    report = hardware.detect(catalog)
    data = report.to_dict()
    assert data["device"]["reason"] and data["dtype"]["reason"] and data["preset"]["reason"]
    if torch.cuda.is_available():
        gpu = report.gpus[0]
        assert report.device.value == "cuda"
        expected = "bf16" if gpu.compute_capability >= (8, 0) else "fp16"
        assert report.dtype.value == expected
        assert report.dtype.reason.startswith(f"{expected}: compute capability {gpu.cc}")
        assert report.capacity_bytes == gpu.total_bytes
    else:
        assert report.device.value == "cpu" and report.preset.value == "cpu"
        assert "CUDA" in report.device.reason or "driver" in report.device.reason
        assert report.dtype.value == ("bf16" if precision.cpu_bf16()[0] else "fp32")
        note = " ".join(report.notes)
        assert "slow" in note and "0.5B" in note
        assert report.capacity_bytes == report.ram_total_bytes
        assert 0 <= report.in_use_bytes < report.ram_total_bytes


def test_doctor_checks_say_what_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    checks = doctor.checks_as_dicts()
    by_name = {c["name"]: c for c in checks}
    assert {"Python", "PyTorch", "NVIDIA driver", "bitsandbytes 4-bit", "Disk space"} <= set(
        by_name
    )
    for check in checks:
        assert check["status"] in ("ok", "warning", "problem")
        assert check["detail"]
        assert check["status"] == "ok" or check["fix"], check
    # bitsandbytes is a requirement: its 4-bit matmul must run on this device (CPU or GPU).
    assert by_name["bitsandbytes 4-bit"]["status"] == "ok", by_name["bitsandbytes 4-bit"]
    torch_check = by_name["PyTorch"]
    if torch.cuda.is_available():
        assert torch_check["status"] == "ok"
    elif hardware.nvidia_hardware_present():
        assert torch_check["status"] == "problem" and "index-url" in torch_check["fix"]
    else:
        assert torch_check["status"] == "warning" and "CPU" in torch_check["detail"]
    disk = doctor.check_disk(tmp_path)
    assert str(tmp_path) in disk.detail
    code = doctor.main(["--data-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "bitsandbytes 4-bit" in out and "checks:" in out
    assert code == (1 if any(c["status"] == "problem" for c in checks) else 0)


FAKE_SMI = """#!/bin/sh
# A stand-in for nvidia-smi: the three queries the studio makes.
case "$1" in
  --query-gpu=*) echo "NVIDIA GeForce RTX 3060, 12288, 550.54.14" ;;
  --query-compute-apps=*) printf '%s\\n' "GPU-faked, $FAKE_OWN_PID, 1536" "GPU-faked, 1, 300" ;;
  *) echo "| NVIDIA-SMI 550.54.14    Driver Version: 550.54.14    CUDA Version: $FAKE_CUDA |" ;;
esac
"""


@pytest.fixture
def fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """nvidia-smi on PATH answering like a 550 driver; torch claims a CUDA 12.8 build."""
    exe = tmp_path / "nvidia-smi"
    exe.write_text(FAKE_SMI, encoding="utf-8")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_OWN_PID", str(os.getpid()))
    build = {"version": "2.13.0+cu128", "cuda": "12.8", "available": True}
    monkeypatch.setattr(hardware, "torch_build", lambda: build)
    return monkeypatch


@pytest.mark.parametrize(
    ("driver_cuda", "status", "words"),
    [
        ("12.8", "ok", "torch uses CUDA 12.8"),
        ("13.0", "ok", "supports CUDA up to 13.0"),
        # An older 12.x driver runs a CUDA 12.8 torch (minor version compatibility): a warning.
        ("12.4", "warning", "minor version compatibility"),
        ("11.8", "problem", "supports CUDA up to 11.8"),
    ],
)
def test_driver_check_allows_cuda_minor_version_compatibility(
    fake_smi: pytest.MonkeyPatch, driver_cuda: str, status: str, words: str
) -> None:
    fake_smi.setenv("FAKE_CUDA", driver_cuda)
    assert hardware.driver_cuda_version() == driver_cuda
    check = doctor.check_driver()
    assert check.status == status, check
    assert words in check.detail and "driver 550.54.14" in check.detail
    assert (check.fix == "") == (status == "ok")


def test_vram_check_does_not_count_its_own_memory(fake_smi: pytest.MonkeyPatch) -> None:
    """12 GiB card, 10 GiB free; 1.5 GiB of the used 2 GiB is this process (its CUDA context
    and torch's cache, as nvidia-smi lists it): other programs hold 0.5 GiB."""
    gpu = hardware.GpuInfo(0, "Faked RTX 3060", 12 * GIB, (8, 6), 10 * GIB, "GPU-faked")
    fake_smi.setattr(hardware, "detect_gpus", lambda: ([gpu], "1 CUDA device(s)"))
    assert hardware.own_cuda_bytes(gpu) == 1536 * 1024**2
    check = doctor.check_vram()
    assert "(0.5 GiB used by other programs)" in check.detail, check.detail
    assert check.status == "ok"
    other_card = hardware.GpuInfo(1, "Another card", 12 * GIB, (8, 6), 10 * GIB, "GPU-other")
    assert hardware.own_cuda_bytes(other_card) == 0  # not listed there; torch holds nothing


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "bf16"])
def test_bitsandbytes_check_runs_in_the_training_dtype(
    monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    """The NF4 matmul runs in whatever `precision` picks (fp16 on an RTX 20xx), not bf16 always."""
    import torch

    faked = precision.Precision(dtype, f"{dtype}: faked")
    monkeypatch.setattr(doctor, "precision", lambda device: faked)
    seen = []
    real = doctor._nf4_matmul_error
    monkeypatch.setattr(
        doctor, "_nf4_matmul_error", lambda device, dt: seen.append(dt) or real(device, dt)
    )
    check = doctor.check_bitsandbytes()
    expected = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert seen == [expected]
    assert check.status == "ok", check
    assert f"in {dtype}" in check.detail
