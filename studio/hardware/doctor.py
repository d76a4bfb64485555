"""Environment check: can this machine train, and if not, what exactly to fix.

Run `python -m studio.doctor [--data-dir DIR]`; the Hardware tab shows the same list. Each
check says ok / warning / problem and, when not ok, the fix. The most common silent failure
is a CPU-only torch on a PC with an NVIDIA card: training then crawls on the CPU with no
error at all, so that check looks for the card outside torch too.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from studio import compat, paths
from studio.gpu import default_device
from studio.hardware import detect as hardware
from studio.models.precision import precision

OK, WARNING, PROBLEM = "ok", "warning", "problem"
GIB = 1024**3
DISK_PROBLEM_GB = 5  # a 1.5B model, a dataset and a few checkpoints
DISK_WARNING_GB = 30  # a 7-8B model is ~15 GB, plus merged exports
TORCH_INDEX = "https://download.pytorch.org/whl/cu128"


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str  # ok, warning or problem
    detail: str
    fix: str = ""


def check_python() -> Check:
    version = platform.python_version()
    if tuple(map(int, platform.python_version_tuple()[:2])) < (3, 11):
        return Check(
            "Python", PROBLEM, f"Python {version}", "install Python 3.11 or newer, then reinstall"
        )
    return Check("Python", OK, f"Python {version} ({platform.system()} {platform.machine()})")


def check_torch() -> Check:
    """Is this torch build able to use the GPU that is in the PC?"""
    try:
        build = hardware.torch_build()
    except Exception as exc:
        return Check(
            "PyTorch",
            PROBLEM,
            f"torch does not import: {type(exc).__name__}: {exc}",
            "pip install -r requirements.txt",
        )
    card = hardware.nvidia_hardware_present()
    if build["cuda"] is None:
        if card:
            return Check(
                "PyTorch",
                PROBLEM,
                f"torch {build['version']} is a CPU-only build, but this PC has an NVIDIA card:"
                " training would silently run on the CPU, many times slower",
                "python -m studio.install (it installs the CUDA build of torch that your driver"
                f" runs), or by hand: pip install torch==<the version in requirements.txt>"
                f" --index-url {TORCH_INDEX} (the index for your CUDA version on pytorch.org)",
            )
        return Check(
            "PyTorch",
            WARNING,
            f"torch {build['version']} (CPU-only) and no NVIDIA card: training runs on the CPU,"
            " fine for the 135M demo model, slow for anything bigger",
            "for real models, use a PC with an NVIDIA GPU (8 GB or more) and the CUDA build of"
            " torch",
        )
    if not build["available"]:
        return Check(
            "PyTorch",
            PROBLEM,
            f"torch {build['version']} is built for CUDA {build['cuda']} but cannot use a GPU",
            "install or update the NVIDIA driver (it must support CUDA"
            f" {build['cuda']}), then restart",
        )
    return Check("PyTorch", OK, f"torch {build['version']} with CUDA {build['cuda']}")


def check_driver() -> Check:
    """Driver and CUDA versions: the driver must support torch's CUDA runtime."""
    smi = hardware.nvidia_smi()
    if smi is None:
        why = hardware.nvidia_smi_problem()
        if why.startswith("nvidia-smi failed"):  # installed, so a driver is meant to be there
            return Check(
                "NVIDIA driver",
                PROBLEM,
                why,
                "reboot after a driver update; if it persists, reinstall the NVIDIA driver"
                " (its kernel module and nvidia-smi must be the same version)",
            )
        if hardware.nvidia_pci_devices() > 0:
            return Check(
                "NVIDIA driver",
                PROBLEM,
                f"an NVIDIA card is on the PCI bus but no driver answers ({why})",
                "install the NVIDIA driver for your card (Linux: your distribution's"
                " nvidia-driver package), then reboot",
            )
        return Check("NVIDIA driver", OK, "no NVIDIA GPU: no driver needed for CPU training")
    driver = smi[0]["driver"] if smi else "?"
    supported = hardware.driver_cuda_version()
    try:
        torch_cuda = hardware.torch_build()["cuda"]
    except Exception:
        torch_cuda = None
    detail = f"driver {driver}, supports CUDA up to {supported or '?'}"
    if not torch_cuda:
        return Check("NVIDIA driver", OK, detail)
    detail += f"; torch uses CUDA {torch_cuda}"
    if not supported or _version(supported) >= _version(torch_cuda):
        return Check("NVIDIA driver", OK, detail)
    fix = f"update the NVIDIA driver to one that supports CUDA {torch_cuda}"
    if _version(supported)[:1] == _version(torch_cuda)[:1]:
        # CUDA minor version compatibility: any driver of a CUDA major release runs programs
        # built with a later minor release of it, short of PTX compiled just in time and the
        # newest features. torch ships compiled kernels, so training runs.
        return Check(
            "NVIDIA driver",
            WARNING,
            detail + f" (runs through CUDA {_version(torch_cuda)[0]} minor version"
            " compatibility; a kernel that needs the newer driver would fail)",
            fix + " when convenient",
        )
    return Check(
        "NVIDIA driver", PROBLEM, detail, fix + ", or install a torch build for an older CUDA"
    )


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".") if p.isdigit())


def check_bitsandbytes() -> Check:
    """QLoRA needs bitsandbytes' 4-bit kernels on this device, in the dtype training uses there."""
    where = "on this device"
    try:
        device = default_device()
        import bitsandbytes as bnb

        compute = precision(device)  # fp16 on a card without native bf16, fp32 on most CPUs
        where = f"on {device} in {compute.name}"
        error = _nf4_matmul_error(device, compute.torch_dtype)
    except Exception as exc:
        return Check(
            "bitsandbytes 4-bit",
            PROBLEM,
            f"a 4-bit NF4 matmul {where} failed: {type(exc).__name__}: {str(exc)[:200]}",
            "pip install bitsandbytes==0.50.2 (QLoRA needs it; LoRA still works without)",
        )
    if error > 0.05:
        return Check(
            "bitsandbytes 4-bit",
            PROBLEM,
            f"the 4-bit matmul {where} is wrong (error {error:.1%})",
            "reinstall bitsandbytes for this CUDA version; use LoRA meanwhile",
        )
    return Check(
        "bitsandbytes 4-bit",
        OK,
        f"bitsandbytes {bnb.__version__}: NF4 quantize + matmul runs {where}, as training will",
    )


def _nf4_matmul_error(device: str, dtype: Any) -> float:
    """Relative error of one tiny NF4 matmul against the dequantized weight's matmul."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes import functional as bnb_f

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen).to(device, dtype)
    x = torch.randn(4, 128, generator=gen).to(device, dtype)
    qw, state = bnb_f.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    y = bnb.matmul_4bit(x, qw.t(), quant_state=state)
    ref = x @ bnb_f.dequantize_4bit(qw, state).t()
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def check_disk(data_dir: Path | None = None) -> Check:
    folder = data_dir or paths.data_dir()
    free = shutil.disk_usage(folder).free
    detail = f"{free / GIB:.0f} GB free in {folder}"
    if free < DISK_PROBLEM_GB * GIB:
        return Check(
            "Disk space",
            PROBLEM,
            detail,
            f"free at least {DISK_PROBLEM_GB} GB, or start with --data-dir on a larger disk",
        )
    if free < DISK_WARNING_GB * GIB:
        return Check(
            "Disk space",
            WARNING,
            detail + " (a 7-8B model takes ~15 GB, checkpoints and exports more)",
            "free some space or use --data-dir on a larger disk for big models",
        )
    return Check("Disk space", OK, detail)


def check_vram() -> Check:
    """Free VRAM now: the desktop, browsers and games hold some of the card."""
    try:
        gpus, why = hardware.detect_gpus()
    except Exception as exc:
        return Check("Free VRAM", WARNING, f"cannot ask torch: {exc}", "see the PyTorch line")
    if not gpus:
        return Check("Free VRAM", OK, f"no GPU in use ({why}): nothing to check")
    lines, worst = [], OK
    for gpu in gpus:
        if gpu.free_bytes is None:
            lines.append(f"GPU {gpu.index} {gpu.name}: free memory unknown")
            continue
        # Asking for free memory made this process a CUDA context, and the bitsandbytes check
        # left blocks in torch's cache: neither belongs to "other programs".
        used = max(0, gpu.total_bytes - gpu.free_bytes - hardware.own_cuda_bytes(gpu))
        lines.append(
            f"GPU {gpu.index} {gpu.name}: {gpu.free_bytes / GIB:.1f} of"
            f" {gpu.total_bytes / GIB:.1f} GiB free ({used / GIB:.1f} GiB used by other programs)"
        )
        if used > 0.25 * gpu.total_bytes:
            worst = WARNING
    fix = "close games, browsers with video, or other GPU programs" if worst != OK else ""
    return Check("Free VRAM", worst, "; ".join(lines), fix)


def check_ram() -> Check:
    total, available = hardware.system_ram()
    detail = f"{available / GIB:.1f} of {total / GIB:.1f} GiB RAM available"
    if available < 4 * GIB:
        return Check("RAM", WARNING, detail, "close other programs: loading a model needs RAM")
    return Check("RAM", OK, detail)


def check_triton() -> Check:
    """Whether TRL's Triton loss head can run: the probe compiles and runs one tiny kernel
    (in a child process, afresh here, and the verdict is kept for training to use).

    Where it cannot, training really does use the studio's compact loss head instead
    (`studio.train.recipe.compact_head_ok` asks the same probe), which is fine; the user
    should know why, and what to install to get the fused head.
    """
    import torch

    if not torch.cuda.is_available():
        return Check("Triton", OK, "no GPU in use: Triton is not needed")
    ready = hardware.triton_ready(fresh=True)
    if ready.value:
        return Check("Triton", OK, ready.reason)
    fix = "optional: Linux, install gcc and the Python headers (python3-dev);"
    fix += " Windows, pip install triton-windows"
    return Check("Triton", WARNING, ready.reason, fix)


def check_multi_gpu(
    system: str | None = None, nccl: Callable[[], bool] | None = None, gpus: int | None = None
) -> Check:
    """Several GPUs train one run through `accelerate launch` (DDP), which needs NCCL: part of
    the Linux CUDA builds of torch, absent on Windows (there, multi-GPU needs Linux or WSL)."""
    import torch.distributed as dist

    system = system or platform.system()
    has_nccl = (nccl or _nccl_available)()
    count = hardware.visible_gpu_count() if gpus is None else gpus
    nccl_text = "NCCL available" if has_nccl else "NCCL not available"
    detail = f"{nccl_text}; gloo {'available' if dist.is_gloo_available() else 'missing'}"
    detail += f"; {count} GPU(s) visible"
    if system == "Windows":
        return Check(
            "Multi-GPU",
            WARNING if count >= 2 else OK,
            detail + "; on Windows one GPU trains a run",
            "training on several GPUs needs Linux or WSL 2 (NCCL does not run on Windows)",
        )
    if count >= 2 and not has_nccl:
        return Check(
            "Multi-GPU",
            WARNING,
            detail,
            "install the CUDA build of torch for Linux (it ships NCCL) to train on all GPUs",
        )
    if count >= 2:
        detail += ": `accelerate launch -m studio.train RUN.yaml` trains on all of them"
    return Check("Multi-GPU", OK, detail)


SYSMEM_FALLBACK_DRIVER = (536, 40)  # the first Windows driver that spills VRAM into RAM


def check_sysmem_fallback() -> Check:
    """Windows: whether the driver may move VRAM overflow into system RAM instead of raising
    out-of-memory. No API reads the setting, so the check says where to look."""
    name = "Sysmem fallback"
    if not compat.sysmem_fallback_possible():
        return Check(name, OK, "not Windows: a run that does not fit stops with out-of-memory")
    smi = hardware.nvidia_smi()
    if not smi:
        return Check(name, OK, "no NVIDIA GPU: nothing to spill")
    driver = smi[0]["driver"]
    if _version(driver)[:2] < SYSMEM_FALLBACK_DRIVER:
        return Check(name, OK, f"driver {driver} is older than 536.40: it has no fallback")
    return Check(
        name,
        WARNING,
        f"driver {driver} may move memory that does not fit on the card into system RAM: a"
        " run that does not fit then goes on 10-50x slower instead of stopping (the setting"
        " cannot be read from here)",
        "check " + compat.SYSMEM_FALLBACK_ADVICE,
    )


def _nccl_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_nccl_available()


CHECKS: list[Callable[[], Check]] = [
    check_python,
    check_torch,
    check_driver,
    check_bitsandbytes,
    check_disk,
    check_vram,
    check_ram,
    check_triton,
    check_multi_gpu,
    check_sysmem_fallback,
]


def run_checks() -> list[Check]:
    """Every check; a check that crashes becomes a problem line instead of an exception."""
    results = []
    for check in CHECKS:
        try:
            results.append(check())
        except Exception as exc:
            name = check.__name__.removeprefix("check_").replace("_", " ")
            results.append(
                Check(name, PROBLEM, f"the check itself failed: {type(exc).__name__}: {exc}")
            )
    return results


def checks_as_dicts() -> list[dict[str, Any]]:
    """The checks as plain data for the UI."""
    return [asdict(c) for c in run_checks()]


def main(argv: list[str] | None = None, selftest: Callable[[str | None], int] | None = None) -> int:
    """Print each check; exit 1 when any is a problem. `--selftest` runs `selftest` (the
    tool `studio.tools.selftest`, handed in by the `python -m studio.doctor` command, since
    the stages never import the tools above them)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="the studio's data dir (default ~/.lora-studio)")
    parser.add_argument(
        "--selftest",
        action="store_true",
        help="train, chat, merge and export a small random model on this machine's device",
    )
    parser.add_argument("--selftest-out", help="where the self-test writes its JSON report")
    args = parser.parse_args(argv)
    if args.data_dir:
        paths.set_data_dir(args.data_dir)
    if args.selftest:
        if selftest is None:
            parser.error("--selftest runs from `python -m studio.doctor --selftest`")
        return selftest(args.selftest_out)
    checks = run_checks()
    marks = {OK: "ok     ", WARNING: "WARNING", PROBLEM: "PROBLEM"}
    for check in checks:
        print(f"[{marks.get(check.status, check.status)}] {check.name}: {check.detail}")
        if check.fix:
            print(f"          fix: {check.fix}")
    problems = sum(c.status == PROBLEM for c in checks)
    print(f"\n{len(checks)} checks: {problems} problem(s)")
    return 1 if problems else 0
