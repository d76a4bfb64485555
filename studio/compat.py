"""Every difference between Windows and POSIX that the studio meets, behind plain functions.

The rest of the code calls these instead of checking `os.name`, so a reader finds each
platform rule once and a test can stand in for Windows by flipping `IS_WINDOWS` or removing a
POSIX module. Foundation layer: imports nothing from `studio`; torch and psutil lazily.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

try:  # POSIX: a lock the kernel drops when its holder dies, even on SIGKILL
    import fcntl
except ImportError:  # Windows has none; liveness falls back to the process' start time
    fcntl = None  # type: ignore[assignment]

IS_WINDOWS = os.name == "nt"

# --- files -------------------------------------------------------------------------------

# Defender, the search indexer or an Explorer preview open a new file for a moment; Windows
# then refuses to rename it (WinError 5 "access denied", 32 "in use by another process").
_BUSY_WINERRORS = (5, 32)
REPLACE_ATTEMPTS = 8
REPLACE_DELAY_S = 0.25  # doubled each try: ~30 s in all, longer than a typical scan


class FileBusyError(PermissionError):
    """A rename that another program kept refusing; the source is left where it was."""


def replace(src: str | Path, dst: str | Path) -> Path:
    """`os.replace(src, dst)`, retried while another program holds one of the two.

    A failed rename changes nothing, so retrying loses nothing; when every try fails the
    error says which file, that it is intact, and what to close. Returns `dst`.
    """
    for attempt in range(1, REPLACE_ATTEMPTS + 1):
        try:
            os.replace(src, dst)
            return Path(dst)
        except PermissionError as exc:
            if getattr(exc, "winerror", None) not in _BUSY_WINERRORS:
                raise  # POSIX, or a real permission problem: retrying would not help
            if attempt == REPLACE_ATTEMPTS:
                raise FileBusyError(
                    errno.EACCES,
                    f"could not move {src} to {dst}: another program (antivirus, the search"
                    f" indexer, an Explorer window or an editor) kept it open for"
                    f" {REPLACE_ATTEMPTS} tries. Nothing was lost: {src} is complete where it"
                    " is. Close programs that may show these files (or exclude the studio's"
                    " data folder from the antivirus scan) and try again.",
                ) from exc
            time.sleep(REPLACE_DELAY_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


# --- names and paths -----------------------------------------------------------------------

# Windows refuses these as a file or folder name, with or without an extension, in any case.
_RESERVED_RE = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³]|conin\$|conout\$)$", re.I)
MAX_PATH = 260  # Windows' limit for a whole path (259 characters plus the terminator)
# The longest home folder the studio plans for: C:\Users\ and a 24-character user name.
LONG_HOME = "C:\\Users\\" + "u" * 24


def reserved_name(name: str) -> bool:
    """True when Windows cannot create a file or folder with this name (`con`, `nul.txt`,
    `COM1.x`): its part before the first dot, trailing spaces ignored, decides."""
    return bool(_RESERVED_RE.match(name.split(".", 1)[0].rstrip(" ")))


def path_fits(path: str) -> bool:
    """Whether Windows (without the long-path setting) can open this full path."""
    return len(path) < MAX_PATH


def shell_quote(path: str | Path) -> str:
    """A path as one argument of a command the user pastes into this system's shell."""
    if IS_WINDOWS:
        return f'"{path}"'
    import shlex

    return shlex.quote(str(path))


# --- processes -----------------------------------------------------------------------------


def process_started(pid: int | None = None) -> float | None:
    """When the process began (seconds since the epoch), or None when there is none."""
    import psutil

    try:
        return psutil.Process(os.getpid() if pid is None else pid).create_time()
    except (psutil.Error, ValueError, OverflowError):
        return None


def process_alive(pid: int, started: float | None) -> bool:
    """Whether the process `pid` that began at `started` still runs. Windows reuses process
    ids quickly, so a bare id check would call a long-dead run alive; the start time tells
    the new process apart. Without a recorded start time only the id can be checked."""
    now = process_started(pid)
    if now is None:
        return False
    return started is None or abs(now - started) < 1.0


def lock_exclusive(fh: TextIO) -> bool:
    """Hold a kernel lock on an open file until it closes or the process dies. False where
    the platform has none (Windows): then liveness is `process_alive`. Raises OSError when
    another process holds it."""
    if fcntl is None:
        return False
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True


def lock_held(path: Path) -> bool | None:
    """Whether another process holds the lock on `path`; None where locks do not exist."""
    if fcntl is None:
        return None
    try:
        with path.open("r", encoding="utf-8") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def termination_signals() -> list[signal.Signals]:
    """Signals that mean "close now" here: SIGTERM everywhere, SIGHUP (terminal closed) on
    POSIX, SIGBREAK (Ctrl-Break, console closed) on Windows."""
    names = ("SIGTERM", "SIGHUP", "SIGBREAK")
    return [getattr(signal, n) for n in names if hasattr(signal, n)]


def new_session_kwargs() -> dict[str, Any]:
    """Popen arguments that keep a child out of the console's Ctrl-C, on either platform."""
    if IS_WINDOWS:
        return {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
    return {"start_new_session": True}


def utf8_child_env(env: dict[str, str]) -> dict[str, str]:
    """A child's environment with UTF-8 pipes and files: on Windows a child would otherwise
    write its output, and open files, in the console's code page (cp1252), which turns
    Vietnamese into `?` or crashes."""
    return {**env, "PYTHONIOENCODING": "utf-8", "PYTHONUTF8": "1"}


def console_safe() -> None:
    """Make printing never crash: a Windows console or a redirected output is often cp1252,
    which cannot encode Vietnamese or Thai, and `print` then raises UnicodeEncodeError.
    Characters the console cannot show come out as escapes instead. Each CLI calls it first."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if reconfigure is not None and not encoding.startswith("utf"):
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")


# --- CUDA on this platform -----------------------------------------------------------------


def nccl_available() -> bool:
    """Whether GPUs can train together here: torch has NCCL on Linux only (Windows' torch has
    none; multi-GPU there goes through WSL 2). Asks torch only once it is imported: the Train
    tab asks while the page is built, without torch, and Linux CUDA wheels ship NCCL."""
    if IS_WINDOWS or sys.platform == "darwin":
        return False
    if "torch" not in sys.modules:
        return True
    try:
        import torch.distributed as dist

        return bool(dist.is_available() and dist.is_nccl_available())
    except Exception:
        return False


def paged_optimizer_spills() -> bool:
    """Whether bitsandbytes' paged optimizers can page their states out to RAM: they use
    CUDA unified memory, which pages on Linux only. On Windows they stay in VRAM."""
    return not IS_WINDOWS


def sysmem_fallback_possible() -> bool:
    """Whether the NVIDIA driver may move VRAM overflow into system RAM instead of raising
    out-of-memory (Windows drivers from 536.40, "CUDA - Sysmem Fallback Policy")."""
    return IS_WINDOWS


SYSMEM_FALLBACK_ADVICE = (
    "NVIDIA Control Panel -> Manage 3D settings -> Program Settings: python.exe ->"
    ' "CUDA - Sysmem Fallback Policy" -> "Prefer No Sysmem Fallback". The run then stops'
    " with an out-of-memory error and advice instead of running 10-50x slower."
)
