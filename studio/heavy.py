"""The heavy libraries (torch, transformers, peft) imported once, by one thread at a time.

Gradio runs handlers on worker threads. Two threads importing transformers' lazy modules at
the same moment can meet in an import cycle, and Python then hands one of them a module that
is still half-initialised: "cannot import name 'AutoModel' from 'transformers'" (seen when
Export was clicked while the page's first estimates were still importing), or "cannot import
name '_FSDPDeviceHandle' from partially initialized module 'torch.distributed.fsdp...'" (seen
when the preference sample was loaded while the page's first plan imported torch).

So the first heavy import of any thread goes through `ready()`, which imports them under one
lock, once: the engine entry points a UI thread reaches call it, and `guard_imports()` (the
app calls it at start) catches the paths that do not: every `import torch` / `from
transformers import ...` statement waits for `ready()` until it has run, then the guard is
gone. The window still comes up before any of them (the imports stay lazy).
"""

from __future__ import annotations

import builtins
import threading
from typing import Any

# Top-level packages whose first import must go through `ready()`.
HEAVY = frozenset({"torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"})

_lock = threading.Lock()
_done = False
_inside = threading.local()  # the thread running `ready()` imports straight through
_plain_import: Any = None  # builtins.__import__ while the guard is installed


def ready() -> None:
    """Import torch, transformers' auto classes and peft, once; other callers wait."""
    global _done
    if _done:
        return
    with _lock:
        if _done:
            return
        _inside.active = True
        try:
            _import_all()
        finally:
            _inside.active = False
        _done = True
        _remove_guard()


def _import_all() -> None:
    import peft  # noqa: F401  (it imports torch.distributed and transformers.generation too)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import (  # noqa: F401  (the classes peft and the loaders use)
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoTokenizer,
    )


def guard_imports() -> None:
    """Make every thread's first import of a HEAVY package wait for `ready()` (which imports
    them all, once); removed as soon as `ready()` has run. Idempotent."""
    global _plain_import
    if _done or _plain_import is not None:
        return
    plain = _plain_import = builtins.__import__

    def guarded(name: str, *args: Any, **kwargs: Any) -> Any:
        # `plain`, not the global: a thread still in here when `ready()` removes the guard
        # (the global is then None) imports on.
        level = kwargs.get("level", args[3] if len(args) > 3 else 0)
        if (
            not _done
            and level == 0
            and name.partition(".")[0] in HEAVY
            and not getattr(_inside, "active", False)
        ):
            ready()
        return plain(name, *args, **kwargs)

    builtins.__import__ = guarded


def _remove_guard() -> None:
    global _plain_import
    if _plain_import is not None:
        builtins.__import__ = _plain_import
        _plain_import = None
