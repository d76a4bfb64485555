"""GPU detection and preset choice (each with its reason) and the environment check."""

from __future__ import annotations

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
        ("NVIDIA A100-SXM4-80GB", 79.3, "rtx3090-24gb", "closest by memory"),
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
        assert report.dtype.reason == f"{report.dtype.value}: compute capability {gpu.cc}" or (
            report.dtype.value == "fp16"
        )
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
