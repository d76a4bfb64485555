"""What every benchmark shares: peak memory, CPU time, the load average, the machine, results.

Portable: psutil gives the CPU time, the load average and the memory on Linux, macOS and
Windows alike (`os.getloadavg` and `resource` do not exist on Windows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import threading
from pathlib import Path
from typing import Any


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 10 ms).

    RSS rather than tracemalloc: tracemalloc slows Python allocation several times, which
    would distort the speed figures measured in the same run.
    """

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.start_bytes = 0
        self.peak_bytes = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:
        self.start_bytes = self.peak_bytes = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)


def cpu_seconds() -> float:
    """CPU seconds this process has used (all threads): a figure the other load on a shared
    machine inflates much less than wall time."""
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def load_averages() -> list[float] | None:
    """The 1/5/15-minute load average (None where it cannot be read). On Windows psutil
    emulates it from a sampling thread started on the first call, so that one reads 0."""
    import psutil

    try:
        return [round(x, 2) for x in psutil.getloadavg()]
    except (OSError, RuntimeError):
        return None


def load_average() -> str:
    """The 1-minute load average: other work on the machine skews every wall-time figure."""
    loads = load_averages()
    return f"{loads[0]:.1f}" if loads else "n/a"


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so RSS can fall again."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, Windows): skip
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles and range of a list of figures."""
    if not values:
        return {}
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "median": round(statistics.median(values), 2),
        "q1": round(q[0], 2),
        "q3": round(q[2], 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


def machine() -> str:
    """The machine in words: CPU model, cores, native bf16 or not, RAM, GPU."""
    import platform

    import psutil

    from studio.models.precision import cpu_bf16

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        cpu = next(names, cpu)
    bf16 = "native bf16" if cpu_bf16()[0] else "no native bf16"
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return f"{cpu} ({platform.machine()}, {bf16}), {os.cpu_count()} cores, {mem:.0f} GiB RAM{gpu}"


def write_results(args: argparse.Namespace, name: str, results: dict[str, Any]) -> None:
    if getattr(args, "json", None):
        path = Path(args.json)
        path.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"results written to {path}")
