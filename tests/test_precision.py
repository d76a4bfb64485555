"""One precision rule for every stage, tested with faked compute capabilities (no GPU here)."""

from __future__ import annotations

import pytest
import torch

from studio.hardware.detect import GpuInfo
from studio.models import precision


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((7, 5), "fp16"),
        ((7, 0), "fp16"),
        ((6, 1), "fp16"),
        ((8, 0), "bf16"),
        ((8, 6), "bf16"),
        ((8, 9), "bf16"),
        ((9, 0), "bf16"),
        ((12, 0), "bf16"),
    ],
)
def test_cuda_precision_needs_native_bf16(monkeypatch, capability, expected) -> None:
    # torch.cuda.is_bf16_supported() says True on a T4 (7.5) through emulation: not asked.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=0: "Faked card")
    chosen = precision.precision("cuda")
    assert chosen.name == expected
    assert f"{capability[0]}.{capability[1]}" in chosen.reason
    assert chosen.torch_dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[expected]
    # the Hardware tab's verdict comes from the same rule
    gpu = GpuInfo(0, "Faked card", 12 * 2**30, capability)
    assert gpu.bf16 is (expected == "bf16")


def test_the_device_index_is_asked_not_gpu_0(monkeypatch) -> None:
    caps = {0: (7, 5), 1: (8, 6)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=0: caps[idx])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=0: f"card {idx}")
    assert precision.precision("cuda:1").name == "bf16"
    assert precision.precision("cuda:0").name == "fp16"


def test_cpu_precision_is_bf16_only_with_native_instructions(monkeypatch) -> None:
    monkeypatch.delenv(precision.CPU_FP32_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert precision.precision("cpu").name == "bf16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert precision.precision("cpu").name == "fp32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setenv(precision.CPU_FP32_ENV, "1")
    assert precision.precision("cpu").name == "fp32"


def test_the_no_bf16_knob_runs_the_studio_as_on_a_cpu_without_it(monkeypatch) -> None:
    """LORA_STUDIO_CPU_NO_BF16 (the suite's fp32 mode) hides the bf16 flags, so the reason
    reads as on such a CPU; it is read with the flags, in this process and in subprocesses."""
    monkeypatch.delenv(precision.CPU_FP32_ENV, raising=False)
    monkeypatch.setenv(precision.CPU_NO_BF16_ENV, "1")
    precision.cpu_flags.cache_clear()
    try:
        assert not precision.cpu_flags() & precision.CPU_BF16_FLAGS
        assert precision.precision("cpu").name == "fp32"
        assert "no native bf16" in precision.precision("cpu").reason
    finally:
        monkeypatch.undo()
        precision.cpu_flags.cache_clear()  # back to this process's own setting


def test_one_home_for_the_rule() -> None:
    """Grep finds the capability check and is_bf16_supported only in the precision module."""
    from pathlib import Path

    root = Path(precision.__file__).resolve().parents[1]
    hits = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if p.name != "precision.py"
        and any(
            s in p.read_text(encoding="utf-8")
            for s in ("is_bf16_supported", "get_device_capability")
        )
    ]
    assert hits == []
