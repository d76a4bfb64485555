"""The heavy libraries (torch, transformers, peft) imported once, by one thread at a time.

Gradio runs handlers on worker threads. Two threads importing transformers' lazy modules at
the same moment can meet in an import cycle, and Python then hands one of them a module that
is still half-initialised: "cannot import name 'AutoModel' from 'transformers'" (seen when
Export was clicked while the page's first estimates were still importing). The engine entry
points that a UI thread reaches (hardware detection, the tokenizer cache, Chat's load, a
run's start, an export) call `ready()` first, so these imports happen under one lock, once.
The window still comes up before any of them (the imports stay lazy).
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_done = False


def ready() -> None:
    """Import torch, transformers' auto classes and peft, once; other callers wait."""
    global _done
    if _done:
        return
    with _lock:
        if _done:
            return
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from transformers import (  # noqa: F401  (the classes peft and the loaders use)
            AutoConfig,
            AutoModel,
            AutoModelForCausalLM,
            AutoTokenizer,
        )

        _done = True
