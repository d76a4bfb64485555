"""The one precision rule: which dtype a device computes in, and why.

Native bf16 on a GPU means compute capability 8.0 or newer (Ampere, Ada, Hopper, Blackwell).
`torch.cuda.is_bf16_supported()` also counts emulation, so on an RTX 20xx, T4 or GTX 16xx it
says yes while bf16 runs slowly there and SDPA's fast kernels refuse it: those cards use fp16.
On a CPU, bf16 pays only with native instructions (AVX512-BF16 or AMX); else fp32.
Training, chat, export, the benchmark, the calibration and the Hardware tab all ask here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

BF16_MIN_CAPABILITY = (8, 0)
CPU_FP32_ENV = "LORA_STUDIO_CPU_FP32"
# Runs the studio as on a CPU without native bf16 (its flags hidden, every reason worded as
# there): the test suite's way to take the fp32 path on a machine that has bf16.
CPU_NO_BF16_ENV = "LORA_STUDIO_CPU_NO_BF16"
CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
_TORCH_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Precision:
    """A compute dtype ("bf16", "fp16" or "fp32") with the reason it was chosen."""

    name: str
    reason: str

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, _TORCH_NAMES[self.name])


def native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability multiplies bf16 in hardware."""
    return tuple(capability) >= BF16_MIN_CAPABILITY


def cuda_precision(capability: tuple[int, int], name: str = "") -> Precision:
    """bf16 on compute capability >= 8.0, else fp16 (never emulated bf16)."""
    cc = f"{capability[0]}.{capability[1]}"
    card = f"{name}, " if name else ""
    if native_bf16(capability):
        return Precision("bf16", f"bf16: {card}compute capability {cc}")
    return Precision("fp16", f"fp16: {card}compute capability {cc} has no native bf16 (needs 8.0)")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux), read once; empty elsewhere.

    LORA_STUDIO_CPU_NO_BF16=1 hides the native-bf16 flags (see CPU_NO_BF16_ENV).
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = (line for line in f if line.startswith("flags"))
            flags = frozenset(next((line.split(":", 1)[1].split() for line in lines), []))
    except OSError:
        flags = frozenset()
    if os.environ.get(CPU_NO_BF16_ENV, "") not in ("", "0"):
        return flags - CPU_BF16_FLAGS
    return flags


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), and why.

    There a bf16 base with bf16 autocast trains about 1.6x faster than fp32 and takes half
    the RAM (`python -m studio.bench train` measures it); elsewhere bf16 is emulated and
    slower than fp32. LORA_STUDIO_CPU_FP32=1 forces fp32.
    """
    if os.environ.get(CPU_FP32_ENV, "") not in ("", "0"):
        return False, f"fp32 on CPU: {CPU_FP32_ENV} is set"
    native = [name for name in ("amx_bf16", "avx512_bf16") if name in cpu_flags()]
    if native:
        return True, f"bf16 autocast on CPU: it has {native[0].upper()}"
    return False, "fp32 on CPU: it has no native bf16 (AVX512-BF16 / AMX)"


def cpu_precision() -> Precision:
    fast, why = cpu_bf16()
    return Precision("bf16" if fast else "fp32", why)


def cuda_index(device: str) -> int:
    """0 for "cuda", 1 for "cuda:1"."""
    _, _, idx = device.partition(":")
    return int(idx) if idx else 0


def precision(device: str) -> Precision:
    """The compute dtype for training or inference on `device` ("cpu", "cuda", "cuda:1")."""
    if not device.startswith("cuda"):
        return cpu_precision()
    import torch

    idx = cuda_index(device)
    return cuda_precision(torch.cuda.get_device_capability(idx), torch.cuda.get_device_name(idx))
