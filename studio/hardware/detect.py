"""Detect the GPU (or its absence) and pick the closest hardware preset, saying why.

Every choice comes with its reason ("bf16: compute capability 8.6"), so the Hardware tab can
show why it chose what it chose. Without a GPU the CPU preset is chosen, with a note on
speed and on which model sizes are sensible.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from studio.hardware.presets import Preset, PresetCatalog, load_presets
from studio.models.precision import cpu_precision, cuda_precision, native_bf16, precision

GIB = 1024**3
# A "12 GB" card reports a little less than 12 GiB; presets match within this share.
VRAM_TOLERANCE = 0.08
_SMI_TIMEOUT_S = 10


@dataclass
class Choice:
    """A decision and the reason for it, for people to read."""

    value: Any
    reason: str


@dataclass
class GpuInfo:
    """One CUDA device as torch sees it."""

    index: int
    name: str
    total_bytes: int
    compute_capability: tuple[int, int]
    free_bytes: int | None = None  # measured now (the desktop and other apps use some)
    uuid: str = ""  # "GPU-..." as nvidia-smi writes it: ties its per-process figures to this card
    own_bytes: int = 0  # this process's CUDA context and cache there: training reuses them

    @property
    def cc(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    @property
    def bf16(self) -> bool:
        return native_bf16(self.compute_capability)

    @property
    def used_bytes(self) -> int | None:
        """Used by other programs: the app's own context is not counted, since the estimate
        adds the context a run needs and the run happens in this process."""
        if self.free_bytes is None:
            return None
        return max(0, self.total_bytes - self.free_bytes - self.own_bytes)


@dataclass
class HardwareReport:
    """What this machine offers for training, each decision with its reason."""

    device: Choice  # "cuda" or "cpu"
    dtype: Choice  # "bf16", "fp16" or "fp32"
    preset: Choice  # preset name
    gpus: list[GpuInfo]
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_count: int
    capacity_bytes: int  # memory of the device training would use (VRAM, or RAM on CPU)
    in_use_bytes: int  # already used there by the desktop and other programs, measured now
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for gpu, raw in zip(self.gpus, data["gpus"], strict=True):
            raw["cc"] = gpu.cc
            raw["bf16"] = gpu.bf16
            raw["used_bytes"] = gpu.used_bytes
        return data


# ------------------------------------------------------------------------- NVIDIA outside torch


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """Rows of `nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader`."""
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0]:
            continue
        match = re.match(r"(\d+)", parts[1])
        rows.append(
            {
                "name": parts[0],
                "memory_bytes": int(match.group(1)) * 1024**2 if match else 0,
                "driver": parts[2],
            }
        )
    return rows


def nvidia_smi() -> list[dict[str, Any]] | None:
    """The driver's own view of the GPUs (works with a CPU-only torch); None without a driver."""
    done, _why = _query_smi()
    return parse_nvidia_smi(done.stdout) if done is not None else None


def nvidia_smi_problem() -> str:
    """Why `nvidia_smi` gave None, in words: "nvidia-smi missing", or "nvidia-smi failed: <its
    own message>" when it is installed but cannot reach the driver (a driver/kernel mismatch
    after an update, a container without the GPU)."""
    done, why = _query_smi()
    return "nvidia-smi answered" if done is not None else why


def _query_smi() -> tuple[subprocess.CompletedProcess | None, str]:
    """nvidia-smi's GPU query, and why it gave nothing when it did."""
    return _run_smi(["--query-gpu=name,memory.total,driver_version",
                     "--format=csv,noheader,nounits"])  # fmt: skip


def _run_smi(args: list[str]) -> tuple[subprocess.CompletedProcess | None, str]:
    """nvidia-smi with `args` (its output as UTF-8 text), or None and why it gave nothing."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "nvidia-smi missing"
    try:
        done = subprocess.run(
            [exe, *args],
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"nvidia-smi failed: {type(exc).__name__}: {exc}"
    if done.returncode != 0:
        said = " ".join((done.stdout + " " + done.stderr).split())[:300]
        return None, f"nvidia-smi failed: {said or f'exit status {done.returncode}'}"
    return done, ""


def driver_cuda_version() -> str | None:
    """Highest CUDA version the installed driver supports ("12.4"), from nvidia-smi's header."""
    done, _ = _run_smi([])
    return None if done is None else parse_driver_cuda_version(done.stdout)


def parse_driver_cuda_version(text: str) -> str | None:
    """The CUDA version in nvidia-smi's header ("Driver Version: 550.54.14  CUDA Version: 12.4")."""
    match = re.search(r"CUDA Version:\s*([\d.]+)", text)
    return match.group(1) if match else None


def nvidia_pci_devices(root: Path = Path("/sys/bus/pci/devices")) -> int:
    """NVIDIA display controllers on the PCI bus (Linux), even with no driver installed."""
    count = 0
    if not root.is_dir():
        return 0
    for dev in root.iterdir():
        try:
            vendor = (dev / "vendor").read_text(encoding="ascii").strip().lower()
            klass = (dev / "class").read_text(encoding="ascii").strip().lower()
        except OSError:
            continue
        if vendor == "0x10de" and klass.startswith("0x03"):
            count += 1
    return count


def nvidia_hardware_present() -> bool:
    """An NVIDIA card is in this PC, whether or not torch can use it."""
    smi = nvidia_smi()
    return bool(smi) or nvidia_pci_devices() > 0


# ------------------------------------------------------------------------- torch's view


def torch_build() -> dict[str, Any]:
    """torch's version and CUDA build (imports torch: call it off the start-up path)."""
    import torch

    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,  # None on a CPU-only build
        "available": bool(torch.cuda.is_available()),
    }


def detect_gpus() -> tuple[list[GpuInfo], str]:
    """The CUDA devices torch can use, or none and the reason."""
    from studio import heavy

    heavy.ready()  # one thread imports torch/transformers at a time
    import torch

    if torch.version.cuda is None:
        reason = f"this torch build ({torch.__version__}) has no CUDA support"
        if nvidia_hardware_present():
            reason += (
                ", although an NVIDIA card is present: install the CUDA build of torch"
                " (see `python -m studio.doctor`)"
            )
        return [], reason
    if not torch.cuda.is_available():
        if nvidia_smi() is None:
            return [], "torch has CUDA but no NVIDIA driver answers (nvidia-smi not found)"
        return [], "torch has CUDA but cannot use the GPU (driver too old for this torch?)"
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        try:
            free, _total = torch.cuda.mem_get_info(index)
        except RuntimeError:
            free = None
        gpus.append(
            GpuInfo(
                index=index,
                name=props.name,
                total_bytes=int(props.total_memory),
                compute_capability=(props.major, props.minor),
                free_bytes=None if free is None else int(free),
                uuid=_smi_uuid(getattr(props, "uuid", "")),
            )
        )
    for gpu in gpus:
        if gpu.free_bytes is not None:
            gpu.own_bytes = own_cuda_bytes(gpu)
    return gpus, f"{len(gpus)} CUDA device(s)"


def card_info(index: int) -> dict[str, Any]:
    """The card a run trains on (`gpu_index`), for its metadata: not GPU 0 when another
    card trains."""
    import torch

    props = torch.cuda.get_device_properties(index)
    capability = (int(props.major), int(props.minor))
    return {
        "gpu_index": index,
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{capability[0]}.{capability[1]}",
        "cuda": torch.version.cuda,
        "native_bf16": native_bf16(capability),
    }


def _smi_uuid(uuid: Any) -> str:
    """torch prints a device's UUID bare; nvidia-smi prefixes it with "GPU-"."""
    text = str(uuid or "")
    return text if not text or text.startswith("GPU-") else f"GPU-{text}"


def parse_compute_apps(text: str) -> list[dict[str, Any]]:
    """Rows of `nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,...`."""
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        match = re.match(r"(\d+)", parts[2])
        if match:
            rows.append(
                {
                    "uuid": parts[0],
                    "pid": int(parts[1]),
                    "used_bytes": int(match.group(1)) * 1024**2,
                }
            )
    return rows


def own_cuda_bytes(gpu: GpuInfo) -> int:
    """This process's memory on `gpu`: its CUDA context and torch's cached blocks.

    nvidia-smi lists each process's use, context included; where it does not list this one (a
    container's own PID namespace, no driver tool), torch's reserved memory is the fallback
    (the context, a few hundred MiB, is then not counted).
    """
    exe = shutil.which("nvidia-smi")
    if exe is not None:
        query = "--query-compute-apps=gpu_uuid,pid,used_memory"
        try:
            done = subprocess.run(
                [exe, query, "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                encoding="utf-8",
                errors="replace",
                timeout=_SMI_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            done = None
        rows = parse_compute_apps(done.stdout) if done and done.returncode == 0 else []
        mine = [r for r in rows if r["pid"] == os.getpid() and r["uuid"] == gpu.uuid]
        if mine:
            return sum(r["used_bytes"] for r in mine)
    import torch

    if not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.memory_reserved(gpu.index))


def _norm(text: str) -> str:
    text = re.sub(r"\b(nvidia|geforce)\b", " ", text.lower())
    return re.sub(r"\s+", " ", text).strip()


def closest_preset(catalog: PresetCatalog, gpu_name: str | None, total_bytes: int | None) -> Choice:
    """The preset for this GPU: by name when its memory agrees, else the closest by memory."""
    cuda = [p for p in catalog.presets.values() if p.kind == "cuda"]
    cpu = next((p for p in catalog.presets.values() if p.kind == "cpu"), None)
    if gpu_name is None or total_bytes is None:
        if cpu is None:
            raise ValueError("no CPU preset is loaded")
        return Choice(cpu.name, "no CUDA GPU: the CPU preset")
    gib = total_bytes / GIB
    named = _named_presets(cuda, gpu_name)
    for fragment, preset in named:
        if abs(gib - preset.vram_gb) <= VRAM_TOLERANCE * preset.vram_gb:
            return Choice(
                preset.name, f"'{gpu_name}' matches '{fragment}' ({gib:.1f} GiB, as the preset)"
            )
    if named:
        fragment, preset = named[0]
        why = f"'{gpu_name}' looks like '{fragment}' but has {gib:.1f} GiB, not"
        why += f" {preset.vram_gb:g}; "
    else:
        why = f"no preset names '{gpu_name}'; "
    return _closest_by_memory(cuda, cpu, gib, why)


def _named_presets(cuda: list[Preset], gpu_name: str) -> list[tuple[str, Preset]]:
    """(fragment, preset) for each preset that names this GPU with the longest fragment.

    The longest fragment wins ("RTX 4060 Ti" over "RTX 4060"); presets that share it (the
    RTX 3080 in 10 and 12 GB) are all returned, and the caller lets memory decide.
    """
    name = _norm(gpu_name)
    found: list[tuple[int, str, Preset]] = []
    for preset in cuda:
        for fragment in preset.match:
            frag = _norm(fragment)
            if frag and re.search(rf"(?<![\w]){re.escape(frag)}(?![\w])", name):
                found.append((len(frag), fragment, preset))
    longest = max((length for length, _, _ in found), default=0)
    return [(fragment, preset) for length, fragment, preset in found if length == longest]


def _closest_by_memory(cuda: list[Preset], cpu: Preset | None, gib: float, why: str) -> Choice:
    """The largest preset the card's memory holds; among equals the least power-hungry card."""
    if not cuda:
        if cpu is None:
            raise ValueError("no presets are loaded")
        return Choice(cpu.name, why + "no GPU presets are loaded: the CPU preset")
    fitting = [p for p in cuda if p.vram_gb <= gib * (1 + VRAM_TOLERANCE)]
    if fitting:
        top = max(p.vram_gb for p in fitting)
        pick = min((p for p in fitting if p.vram_gb == top), key=lambda p: p.board_power_w)
        return Choice(pick.name, why + f"closest by memory: {gib:.1f} GiB → {pick.label}")
    pick = min(cuda, key=lambda p: (p.vram_gb, p.board_power_w))
    return Choice(
        pick.name,
        why + f"{gib:.1f} GiB is less than any preset: {pick.label}, the smallest;"
        " check the fit estimate",
    )


def cpu_note(ram_total_bytes: int, cpu_count: int) -> str:
    """What to expect from CPU training, so nobody waits a day for a 7B model."""
    return (
        f"No GPU: training runs on the CPU ({cpu_count} cores, {ram_total_bytes / GIB:.0f} GiB"
        " RAM) and is slow. The 135M default model takes a few seconds per step (batch 4, short"
        " rows): fine for a demo or a small dataset. Up to about 0.5B parameters is sensible;"
        " 1B and larger take hours per epoch."
    )


def system_ram() -> tuple[int, int]:
    """(total, available) system RAM in bytes."""
    try:
        import psutil

        mem = psutil.virtual_memory()
        return int(mem.total), int(mem.available)
    except Exception:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(pages), int(pages)


def ram_used_by_others() -> int:
    """RAM other programs hold: in use minus this process (the estimate counts the app itself)."""
    total, available = system_ram()
    try:
        import psutil

        own = int(psutil.Process().memory_info().rss)
    except Exception:
        own = 0
    return max(0, total - available - own)


def detect(catalog: PresetCatalog | None = None) -> HardwareReport:
    """The device training will use, its dtype and the closest preset, each with its reason."""
    catalog = catalog or load_presets()
    ram_total, ram_available = system_ram()
    cpus = os.cpu_count() or 1
    try:
        gpus, why = detect_gpus()
    except Exception as exc:  # a broken torch install must not break the Hardware tab
        gpus, why = [], f"torch failed to start: {type(exc).__name__}: {exc}"
    notes: list[str] = []
    if gpus:
        gpu = gpus[0]
        device = Choice("cuda", f"CUDA GPU 0: {gpu.name}, {gpu.total_bytes / GIB:.1f} GiB")
        chosen = cuda_precision(gpu.compute_capability)
        dtype = Choice(chosen.name, chosen.reason)
        preset = closest_preset(catalog, gpu.name, gpu.total_bytes)
        capacity, in_use = gpu.total_bytes, gpu.used_bytes or 0
        if len(gpus) > 1:
            notes.append(multi_gpu_note(gpus))
        if gpu.used_bytes is not None and gpu.used_bytes > 0.15 * gpu.total_bytes:
            notes.append(
                f"{gpu.used_bytes / GIB:.1f} GiB of the card is already in use by other programs:"
                " close games or GPU-heavy apps before training"
            )
    else:
        device = Choice("cpu", f"CPU: {why}")
        chosen = cpu_precision()
        dtype = Choice(chosen.name, chosen.reason)
        preset = closest_preset(catalog, None, None)
        capacity, in_use = ram_total, ram_used_by_others()
        notes.append(cpu_note(ram_total, cpus))
    return HardwareReport(
        device=device,
        dtype=dtype,
        preset=preset,
        gpus=gpus,
        ram_total_bytes=ram_total,
        ram_available_bytes=ram_available,
        cpu_count=cpus,
        capacity_bytes=int(capacity),
        in_use_bytes=int(in_use),
        notes=notes + catalog.problems,
    )


# ------------------------------------------------------------------------- several GPUs


def multi_gpu_note(gpus: list[GpuInfo]) -> str:
    """Several cards: one trains by default, or all of them through accelerate (DDP)."""
    names = ", ".join(f"{g.name} {g.total_bytes / GIB:.0f} GiB" for g in gpus)
    return (
        f"{len(gpus)} GPUs found ({names}): a run trains on one (pick it below), or on all"
        f' {len(gpus)} with the Train tab\'s "Use all {len(gpus)} GPUs" (DDP: every card holds'
        " the whole model and its own batch)"
    )


def visible_gpu_count() -> int:
    """How many GPUs a training process would see, without importing torch (the Train tab
    asks while the page is built): the driver's list, narrowed by CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    smi = nvidia_smi() or []
    if visible is None:
        return len(smi)
    picked = [x for x in visible.split(",") if x.strip() and x.strip() != "-1"]
    return min(len(picked), len(smi))


def c_compiler() -> str | None:
    """The C compiler Triton builds its kernel launchers with (CC, else cc/gcc/clang)."""
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def triton_ready(fresh: bool = False, probe: bool = True) -> Choice:
    """Whether TRL's Triton loss head can run on a GPU here, and why.

    TRL takes the Triton path whenever the package imports; its kernels are then built at the
    first step, which fails on a Linux without a C compiler or without `Python.h`. So the
    answer is the probe's (`triton_probe.verdict`: one tiny kernel compiled in a child, once
    per Python and Triton version). Where it says no, the studio's compact head is used on
    CUDA (`studio.train.recipe.compact_head_ok`): TRL's torch fallback scores every position
    in fp32 tiles of 256-512 MiB and is slow.
    """
    import platform

    from studio.hardware import triton_probe

    version = triton_probe.triton_version()
    if version is None:
        return Choice(False, "no Triton installed: training uses the studio's compact loss head")
    if platform.system() == "Linux" and not c_compiler():
        return Choice(
            False,
            f"Triton {version} is installed but no C compiler (cc/gcc/clang) is: it cannot"
            " build kernels, so training uses the studio's compact loss head (install gcc)",
        )
    found = triton_probe.verdict(fresh=fresh, probe=probe)
    return Choice(found.ok, found.reason)


def compact_head_on(device: str, triton_ok: bool | None = None, probe: bool = True) -> bool:
    """Whether runs on `device` score the loss with the studio's compact head instead of
    TRL's fused one: on a CPU, and on a GPU where Triton is not ready. The one statement of
    the rule: the recipe adds only the model's own exception (logit scaling,
    `studio.train.recipe.compact_head_ok`), the estimate and the Hardware tab ask here.
    `triton_ok`: a verdict already in hand; else Triton's (probed, or cached with `probe=False`).
    """
    if not device.startswith("cuda"):
        return True
    if triton_ok is None:
        triton_ok = bool(triton_ready(probe=probe).value)
    return not triton_ok


def estimate_kernel(device: str) -> str:
    """The VRAM estimate's profile for a run on `device`: "cuda", "cpu-bf16" or "cpu".

    On a CPU the run computes in whatever `precision` picks (bf16 only with native
    instructions), so the estimate follows the same rule that training will.
    """
    if device.startswith("cuda"):
        return "cuda"
    return "cpu-bf16" if precision(device).name == "bf16" else "cpu"
