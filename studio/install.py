"""Install LoRA Studio's packages, with the torch build that this PC's NVIDIA driver can run.

    python -m studio.install             Windows: py -3.11 -m studio.install
    python -m studio.install --start     install, then start the app
    python -m studio.install --dry-run   only say what it would install

The same on Windows and Linux, and for the same reason: PyPI's torch for Windows is CPU-only,
and `pip install -r requirements.txt` keeps whatever torch it finds, so a CPU torch on a PC
with a GPU is the most common silent failure. This script reads the CUDA version the driver
supports from `nvidia-smi`, installs torch from PyTorch's own index for that build (or the CPU
build, and says so), then requirements.txt, and checks that torch sees the GPU.

Only the standard library: nothing else is installed yet when it runs. No admin rights, no
PowerShell, and it downloads only from PyPI and download.pytorch.org, through pip.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: app.py, requirements.txt
REQUIREMENTS = ROOT / "requirements.txt"
TORCH_INDEX = "https://download.pytorch.org/whl/"
# torch 2.13's CUDA builds on PyTorch's index, newest first (its release matrix: CUDA 12.6
# and 13.0 stable). A wheel runs on a driver for its CUDA major version (minor version
# compatibility), best on one at least as new as the build.
CUDA_BUILDS = (((13, 0), "cu130"), ((12, 6), "cu126"))
DRIVER_ADVICE = (
    "update the NVIDIA driver (nvidia.com/drivers; a driver for CUDA 12.6 or newer, 560+)"
    " and run this installer again to get the GPU build"
)


@dataclass(frozen=True)
class TorchChoice:
    """Which torch build to install, from which index, and why (shown to the user)."""

    build: str  # "cu130", "cu126" or "cpu"
    reason: str

    @property
    def index_url(self) -> str:
        return TORCH_INDEX + self.build

    @property
    def cuda(self) -> bool:
        return self.build != "cpu"


def driver_cuda(smi_output: str | None) -> tuple[int, int] | None:
    """The CUDA version in nvidia-smi's header ("CUDA Version: 12.4"), or None.

    `studio.hardware.detect` has the same parser, but this script runs before any package
    (yaml, psutil) that the studio imports is installed."""
    match = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi_output or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def choose_torch(smi_output: str | None) -> TorchChoice:
    """The torch build for a PC whose `nvidia-smi` printed `smi_output` (None: no such
    command, so no NVIDIA driver)."""
    if smi_output is None:
        return TorchChoice(
            "cpu",
            "no NVIDIA card or driver found (no nvidia-smi): the CPU build; training runs on"
            " the CPU, slowly (install the NVIDIA driver first if the PC has a card)",
        )
    version = driver_cuda(smi_output)
    if version is None:
        return TorchChoice("cpu", "nvidia-smi names no CUDA version: the CPU build")
    shown = f"{version[0]}.{version[1]}"
    for build_version, build in CUDA_BUILDS:
        if build_version <= version:
            return TorchChoice(build, f"the driver supports CUDA {shown}: the {build} build")
    for build_version, build in reversed(CUDA_BUILDS):
        if build_version[0] == version[0]:
            return TorchChoice(
                build, f"the driver supports CUDA {shown}: the {build} build (same CUDA major)"
            )
    return TorchChoice(
        "cpu",
        f"the driver supports only CUDA {shown}, too old for torch's GPU builds:"
        f" the CPU build for now; {DRIVER_ADVICE}",
    )


def read_nvidia_smi() -> str | None:
    """nvidia-smi's output, or None when the command is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe], capture_output=True, text=True, encoding="utf-8", errors="replace",
            timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def torch_requirement(requirements: Path = REQUIREMENTS) -> str:
    """The torch pin in requirements.txt ("torch==2.13.0"), so the version is set once."""
    for line in requirements.read_text(encoding="utf-8").splitlines():
        if re.match(r"^torch\s*==", line.strip()):
            return line.split("#", 1)[0].strip()
    raise SystemExit(f"{requirements} pins no torch version")


def pip_commands(choice: TorchChoice, requirements: Path = REQUIREMENTS) -> list[list[str]]:
    """torch first, then the rest; pip keeps the torch it just installed because
    `torch==2.13.0` is satisfied by 2.13.0+cu126. A CUDA build comes from PyTorch's index
    (PyPI's torch for Windows is CPU-only); the CPU case takes torch from the package index
    pip is set up with, as `pip install -r requirements.txt` would (PyPI, or a mirror where
    PyTorch's own index is out of reach)."""
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    torch = [*pip, torch_requirement(requirements)]
    if choice.cuda:
        torch += ["--index-url", choice.index_url]
    return [torch, [*pip, "-r", str(requirements)]]


def check_torch(choice: TorchChoice) -> tuple[bool, str]:
    """Whether the installed torch is the build chosen and, for a CUDA build, sees the GPU."""
    code = "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
        errors="replace", check=False,
    )  # fmt: skip
    if done.returncode != 0:
        return False, f"torch does not import: {done.stderr.strip()[-500:]}"
    version, cuda, available = done.stdout.split()
    if not choice.cuda:
        return True, f"torch {version} (CPU build) works; training runs on the CPU, slowly"
    if cuda == "None":
        return False, f"torch {version} is a CPU build although {choice.build} was installed"
    if available != "True":
        return False, (
            f"torch {version} (CUDA {cuda}) cannot use the GPU: {DRIVER_ADVICE};"
            " `python -m studio.doctor` says more"
        )
    return True, f"torch {version} (CUDA {cuda}) sees the GPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", action="store_true", help="start the app after installing")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    args = parser.parse_args(argv)
    if sys.version_info < (3, 11):  # noqa: UP036 (the user may run an older Python)
        print(f"LoRA Studio needs Python 3.11 or newer; this is {sys.version.split()[0]}.")
        return 2
    choice = choose_torch(read_nvidia_smi())
    print(f"torch: {choice.reason}", flush=True)
    for cmd in pip_commands(choice):
        print("$ python " + " ".join(cmd[1:]), flush=True)
        if not args.dry_run and subprocess.call(cmd) != 0:
            print("pip failed (its message is above); nothing else was changed.")
            return 1
    if args.dry_run:
        return 0
    ok, message = check_torch(choice)
    print(message)
    if not ok:
        return 1
    if args.start:
        return subprocess.call([sys.executable, str(ROOT / "app.py")])
    print(f"Installed. Start the app with: {Path(sys.executable).name} app.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
