"""Long context on a small card: whether a run uses TRL's activation offloading, Liger's
kernels and a tiled MLP, each with its reason.

The first two are maintained parts, not the studio's own kernels:
- TRL's `activation_offloading` (SFTConfig) copies what autograd saves outside the checkpointed
  layers, their inputs, to pinned host RAM; it needs an accelerator, so a CPU run never uses it;
- Liger's kernels through `use_liger_kernel` (RMSNorm, SwiGLU, RoPE) need Triton and the
  `liger-kernel` package. Liger's fused linear cross-entropy is not used: TRL 1.16 refuses it,
  since its own fused LM head already scores without the full-vocabulary logits (or, where
  Triton is not ready, the studio's compact head does). One home per concern: the loss head.

The third, `studio.train.tiled_mlp`, is plain PyTorch (DeepSpeed's TiledMLP design): it runs
wherever the run does, Windows without Triton included, but costs an extra MLP forward a step.

`choose` decides from the VRAM estimate (`studio.hardware.vram`): with "auto", Liger first
(it costs no speed), then offloading if the estimate is still not "fits" and the pinned copies
fit in the RAM available, then the tiled MLP if the estimate is still not "fits". "on" and
"off" in the run's settings override; "on" where the machine cannot run it is "off" with the
reason, never a crash. The answer is plain data: the Hardware tab shows it and a run records
it in its metadata.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from studio.config import RunConfig
from studio.hardware import vram

# The families whose layers Liger patches the way the estimate assumes (RMSNorm, SwiGLU MLP).
LIGER_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
LIGER_MIN_VERSION = (0, 3, 0)  # what transformers' `use_liger_kernel` asks for


@dataclass(frozen=True)
class Capabilities:
    """What this machine offers the two options; faked in tests, probed by `detect_for`."""

    accelerator: bool  # the run trains on a CUDA card
    triton_ok: bool
    triton_reason: str
    liger_installed: bool
    host_available_bytes: int  # RAM free for the pinned copies
    multi_process: bool = False  # a multi-GPU (DDP) rank: no tiled MLP


@dataclass(frozen=True)
class Switch:
    """One option: on or off, and why, in words for people."""

    on: bool
    reason: str


OFF = Switch(False, "off")


@dataclass
class LongContext:
    """The three choices and the estimate with them (None where the model's shape is unknown)."""

    offload: Switch
    liger: Switch
    estimate: vram.VramEstimate | None = None
    tiled: Switch = OFF

    @property
    def options(self) -> vram.Options:
        return vram.Options(self.offload.on, self.liger.on, self.tiled.on)

    def to_dict(self) -> dict[str, Any]:
        return {
            "activation_offloading": self.offload.on,
            "activation_offloading_reason": self.offload.reason,
            "liger_kernels": self.liger.on,
            "liger_kernels_reason": self.liger.reason,
            "tiled_mlp": self.tiled.on,
            "tiled_mlp_reason": self.tiled.reason,
        }

    def lines(self) -> list[str]:
        return [
            f"Activation offloading {'on' if self.offload.on else 'off'}: {self.offload.reason}",
            f"Liger kernels {'on' if self.liger.on else 'off'}: {self.liger.reason}",
            f"Tiled MLP {'on' if self.tiled.on else 'off'}: {self.tiled.reason}",
        ]


def liger_installed() -> bool:
    """Whether `liger-kernel` (>= 0.3.0) is importable; read from its metadata, not imported."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = tuple(int(x) for x in version("liger-kernel").split(".")[:3] if x.isdigit())
    except PackageNotFoundError:
        return False
    return found >= LIGER_MIN_VERSION


def detect_for(device: str, probe: bool = True) -> Capabilities:
    """This machine's capabilities for a run on `device` ("cuda", "cuda:1" or "cpu").

    `probe=False` takes Triton's cached verdict only (the Hardware tab must not compile)."""
    from studio.hardware.detect import system_ram, triton_ready

    cuda = device.startswith("cuda")
    triton = triton_ready(probe=probe) if cuda else None  # it matters only on a GPU
    return Capabilities(
        accelerator=cuda,
        triton_ok=bool(triton and triton.value),
        triton_reason=triton.reason if triton else "",
        liger_installed=liger_installed(),
        host_available_bytes=system_ram()[1],
    )


def settings_of(settings: RunConfig | Mapping[str, Any]) -> tuple[str, str, str]:
    """(activation_offloading, liger_kernels, tiled_mlp) of a run's settings; "auto" where
    unset."""
    if isinstance(settings, RunConfig):
        return settings.activation_offloading, settings.liger_kernels, settings.tiled_mlp

    def mode(name: str) -> str:
        return str(settings.get(name) or "auto")

    return mode("activation_offloading"), mode("liger_kernels"), mode("tiled_mlp")


def choose(
    shape: vram.ModelShape,
    settings: RunConfig | Mapping[str, Any],
    caps: Capabilities,
    *,
    capacity_bytes: int | None,
    in_use_bytes: int = 0,
    device: str = "cuda",
    compact_head: bool = False,
) -> LongContext:
    """The options for a run of `shape` with `settings` on a card of `capacity_bytes`."""
    offload_mode, liger_mode, tiled_mode = settings_of(settings)

    def est(offload: bool, liger: bool, tiled: bool = False) -> vram.VramEstimate:
        return vram.estimate(
            shape,
            settings,
            capacity_bytes=capacity_bytes,
            in_use_bytes=in_use_bytes,
            device=device,
            compact_head=compact_head,
            offload_activations=offload,
            liger_kernels=liger,
            tiled_mlp=tiled,
        )

    plain = est(False, False)
    liger = _decide(liger_mode, plain, _liger_blocker(shape.model_type, caps))
    with_liger = est(False, liger.on)
    offload = _decide(offload_mode, with_liger, _offload_blocker(caps, est(True, liger.on)))
    tiled = _decide(tiled_mode, est(offload.on, liger.on), _tiled_blocker(caps))
    return LongContext(offload, liger, est(offload.on, liger.on, tiled.on), tiled)


def for_run(
    cfg: RunConfig, model_path: str, device: str, multi_process: bool = False
) -> LongContext:
    """The options a run takes, decided as it starts: this machine probed, the card's memory
    measured before the model loads (`device`: the run's torch device, "cuda:N" or "cpu";
    `multi_process`: this is one rank of a multi-GPU run)."""
    from dataclasses import replace

    from studio.hardware.detect import compact_head_on, estimate_kernel

    caps = replace(detect_for(device), multi_process=multi_process)
    capacity, in_use = _memory_now(device)
    try:
        shape = vram.model_shape(str(model_path))
    except (vram.ModelShapeError, ValueError) as exc:
        return _without_estimate(cfg, caps, f"no estimate for this model ({exc})")
    return choose(
        shape,
        cfg,
        caps,
        capacity_bytes=capacity,
        in_use_bytes=in_use,
        device=estimate_kernel(device),
        compact_head=compact_head_on(device, caps.triton_ok),
    )


def _memory_now(device: str) -> tuple[int, int]:
    """(capacity, in use) of the device the run trains on: the card, or RAM on a CPU."""
    from studio.hardware.detect import ram_used_by_others, system_ram

    if not device.startswith("cuda"):
        return system_ram()[0], ram_used_by_others()
    import torch

    index = int(device.partition(":")[2] or 0)
    free, total = torch.cuda.mem_get_info(index)
    return int(total), int(total - free)


def _without_estimate(cfg: RunConfig, caps: Capabilities, why: str) -> LongContext:
    """No shape to estimate with: "on" is honoured where the machine can run it."""
    liger = _decide(cfg.liger_kernels, None, _liger_blocker("", caps, check_family=False))
    offload = _decide(cfg.activation_offloading, None, _offload_blocker(caps, None))
    tiled = _decide(cfg.tiled_mlp, None, _tiled_blocker(caps))
    if not liger.on and cfg.liger_kernels == "auto":
        liger = Switch(False, f"auto: {why}")
    if not offload.on and cfg.activation_offloading == "auto":
        offload = Switch(False, f"auto: {why}")
    if not tiled.on and cfg.tiled_mlp == "auto":
        tiled = Switch(False, f"auto: {why}")
    return LongContext(offload, liger, tiled=tiled)


def _decide(mode: str, before: vram.VramEstimate | None, blocker: str) -> Switch:
    """One option from its setting, the estimate without it, and what stops it here ("")."""
    if mode == "off":
        return Switch(False, "off in the run's settings")
    if mode == "on":
        if blocker:
            return Switch(False, f"asked for in the run's settings, but {blocker}")
        return Switch(True, "on in the run's settings")
    verdict = before.verdict if before is not None else "unknown"
    if verdict == "fits":
        return Switch(False, "auto: not needed, the run fits without it")
    if blocker:
        return Switch(False, f"auto: {blocker}")
    if before is None or verdict == "unknown":
        return Switch(False, "auto: no memory size to compare with")
    peak = f"{before.total_bytes / vram.GIB:.1f} of {(before.available_bytes or 0) / vram.GIB:.1f}"
    return Switch(True, f"auto: the estimate says {verdict} without it ({peak} GiB)")


def _liger_blocker(model_type: str, caps: Capabilities, check_family: bool = True) -> str:
    """Why Liger's kernels cannot run here, or "" when they can."""
    if not caps.accelerator:
        return "Liger's kernels are Triton GPU kernels and this run is on the CPU"
    if not caps.triton_ok:
        return f"Triton is not ready ({caps.triton_reason})"
    if not caps.liger_installed:
        return "liger-kernel is not installed (optional, GPU only: pip install liger-kernel)"
    if check_family and model_type not in LIGER_FAMILIES:
        return f"the studio uses Liger only for {', '.join(sorted(LIGER_FAMILIES))} models"
    return ""


def _offload_blocker(caps: Capabilities, offloaded: vram.VramEstimate | None) -> str:
    """Why TRL's offloading cannot run here, or "" when it can (the host RAM check too)."""
    if not caps.accelerator:
        return "TRL's activation offloading needs an accelerator and this run is on the CPU"
    if offloaded is None:
        return ""
    room = vram.HOST_RAM_SHARE * caps.host_available_bytes
    if offloaded.host_bytes > room:
        return (
            f"it would pin {offloaded.host_bytes / vram.GIB:.1f} GiB of host RAM and only"
            f" {caps.host_available_bytes / vram.GIB:.1f} GiB is available"
            f" (the studio uses up to {vram.HOST_RAM_SHARE:.0%} of it)"
        )
    return ""


def _tiled_blocker(caps: Capabilities) -> str:
    """Why the tiled MLP cannot run here, or "" when it can (plain PyTorch: any device)."""
    if caps.multi_process:
        return "a multi-GPU run: the tiled MLP's inner backward is untested with DDP's hooks"
    return ""
