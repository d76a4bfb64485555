"""Whether Triton can build kernels here: compile and run one tiny kernel, once, in a child.

Triton importing is not enough. On Linux it builds each kernel's launcher with the C compiler
against `Python.h`, which distro and deadsnakes Python builds often lack; TRL's fused loss head
then fails at step 1, and Retry cannot fix it. So the studio compiles one kernel in a child
process (a compile error or a crash there cannot take the app down) and keeps the verdict per
Python executable and Triton version: in memory, and in `triton_probe.json` in the data dir so
the next start does not pay for it again. `python -m studio.doctor` probes afresh.

Run as a script (`python triton_probe.py`) it is the probe itself: it imports only torch and
triton, so it works whatever the studio's own imports do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

CACHE_FILE = "triton_probe.json"
# A first compile takes 5-30 s (the launcher is built with gcc); a hung driver must not hang us.
PROBE_TIMEOUT_S = 180


@dataclass(frozen=True)
class Verdict:
    """The probe's answer and its reason, in words the doctor and the run's metadata show."""

    ok: bool
    reason: str


_memory: dict[str, Verdict] = {}  # key: "<python executable> | triton <version>"


def triton_version() -> str | None:
    """The installed Triton's version, read from its metadata (fast: no import)."""
    for name in ("triton", "triton-windows"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def probe_command() -> list[str]:
    """The child that compiles the kernel: this file run by the app's own Python."""
    return [sys.executable, str(Path(__file__).resolve())]


def verdict(fresh: bool = False, probe: bool = True) -> Verdict:
    """Whether Triton builds and runs a kernel here; probes once per Python and Triton version
    (`fresh` probes again, as the doctor does, and stores the new answer). With `probe` off
    (the Hardware tab's estimate, which must not wait for a compile) an unprobed Triton is
    counted as not ready: the compact head's estimate is the larger one."""
    version = triton_version()
    if version is None:
        return Verdict(False, "no Triton installed: training uses the studio's compact loss head")
    key = f"{sys.executable} | triton {version}"
    if not fresh:
        known = _memory.get(key) or _read_cache().get(key)
        if known is not None:
            _memory[key] = known
            return known
        if not probe:
            return Verdict(False, f"Triton {version} not probed yet: the first run probes it")
    found = _probe(version)
    _memory[key] = found
    _write_cache(key, found)
    return found


def _probe(version: str) -> Verdict:
    """Run the probe child and turn its exit into a verdict."""
    try:
        done = subprocess.run(
            probe_command(),
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return _failed(version, f"the probe did not finish in {PROBE_TIMEOUT_S} s")
    except OSError as exc:
        return _failed(version, f"the probe could not start ({exc})")
    if done.returncode == 0 and "ok" in done.stdout:
        return Verdict(True, f"Triton {version} compiled and ran a test kernel: TRL's fused head")
    return _failed(version, _why(done.returncode, done.stderr))


def _failed(version: str, why: str) -> Verdict:
    return Verdict(
        False,
        f"Triton {version} cannot build kernels here ({why}): training uses the studio's"
        " compact loss head",
    )


def _why(returncode: int, stderr: str) -> str:
    """The line of the child's error that says what went wrong, and what to do about it."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # the compiler's own "error:" line names the cause; Python's traceback ends in a wrapper
    compiler = [line for line in lines if "error:" in line.lower() and ".c:" in line]
    errors = [line for line in lines if "error" in line.lower()]
    why = (compiler or errors or lines or [f"exit status {returncode}"])[-1][-240:]
    if returncode < 0:
        why = f"the probe crashed with signal {-returncode}"
    if "Python.h" in stderr:
        major, minor = sys.version_info[:2]
        why += f"; install the Python headers (e.g. python{major}.{minor}-dev)"
    elif "gcc" in stderr.lower() or "compiler" in stderr.lower():
        why += "; install a C compiler (gcc)"
    return why


def _cache_path() -> Path:
    from studio import paths

    return paths.data_dir() / CACHE_FILE


def _read_cache() -> dict[str, Verdict]:
    try:
        raw = json.loads(_cache_path().read_text(encoding="utf-8"))
        return {key: Verdict(bool(v["ok"]), str(v["reason"])) for key, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # missing or damaged: probe again


def _write_cache(key: str, found: Verdict) -> None:
    path = _cache_path()
    known = {k: {"ok": v.ok, "reason": v.reason} for k, v in _read_cache().items()}
    known[key] = {"ok": found.ok, "reason": found.reason}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(known, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only data dir: the verdict stays in memory


def _run_kernel() -> None:
    """Compile a one-line kernel and check its result (x + 1 on 16 values)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, block: tl.constexpr):
        offs = tl.arange(0, block)
        mask = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)

    x = torch.zeros(16, device="cuda")
    add_one[(1,)](x, 16, block=16)
    torch.cuda.synchronize()
    if not bool((x == 1).all()):
        raise RuntimeError("the test kernel gave a wrong result")
    print("ok")


if __name__ == "__main__":
    _run_kernel()
