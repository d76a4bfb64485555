"""`python -m studio.models [NAME]`: get a base model onto this machine and say where it is.

    python -m studio.models Qwen/Qwen2.5-0.5B-Instruct     # download (bytes, speed, ETA)
    python -m studio.models --list                          # the catalogue
    python -m studio.models --login                         # store a hub token (gated models)

Ctrl-C cancels a download and keeps what came in; the same command continues it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

from studio import paths
from studio.models.loader import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    greedy_answer,
    load_model_for_inference,
    load_tokenizer,
    resolve_model,
)

# Progress lines at most this often (a log file of a 16 GB download stays readable).
_LINE_EVERY_S = 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m studio.models", description=__doc__.split("\n")[0]
    )
    parser.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    parser.add_argument("--data-dir")
    parser.add_argument("--ask", help="also load it and answer this prompt greedily")
    parser.add_argument("--list", action="store_true", help="print the model catalogue")
    parser.add_argument("--login", action="store_true", help="store a hub token (read from stdin)")
    args = parser.parse_args(argv)
    if args.data_dir:
        paths.set_data_dir(args.data_dir)
    if args.list:
        return _print_catalog()
    if args.login:
        return _login()
    return _get(args.name, args.ask)


def _get(name: str, ask: str | None) -> int:
    from studio.models.hub import HubError

    cancel = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: _cancel(cancel))
    last = [0.0]

    def bytes_line(p: Any) -> None:
        now = time.monotonic()
        if p.finished or now - last[0] >= _LINE_EVERY_S:
            last[0] = now
            print(p.line(), flush=True)

    def step(message: str, _fraction: float) -> None:
        if not message.startswith("Downloading "):  # the byte lines say it better
            print(message, flush=True)

    try:
        resolved = resolve_model(name, step, download_progress=bytes_line, cancel=cancel)
    except HubError as exc:  # cancelled
        print(exc, file=sys.stderr)
        return 130
    except ModelNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{resolved.name}: {resolved.path} ({resolved.source}, {resolved.revision})")
    for note in resolved.notes:
        print(f"note: {note}")
    if ask:
        model = load_model_for_inference(resolved.path)
        print(greedy_answer(model, load_tokenizer(resolved.path), ask))
    return 0


def _cancel(cancel: threading.Event) -> None:
    """Ctrl-C: stop at the next chunk (not mid-write), keeping the partial file to resume."""
    if cancel.is_set():
        raise KeyboardInterrupt
    print("Cancelling (Ctrl-C again to quit at once)…", file=sys.stderr, flush=True)
    cancel.set()


def _print_catalog() -> int:
    from studio.models.catalog import catalog, size_text

    for entry in catalog().values():
        gated = "gated" if entry.gated else "open"
        twin = f" · 4-bit: {entry.bnb_4bit}" if entry.bnb_4bit else ""
        print(
            f"{entry.id:42} {entry.params_b:>5}B {size_text(entry.download_bytes):>8}"
            f" · {entry.licence} · {gated} · {entry.template}{twin}"
        )
    return 0


def _login() -> int:
    import getpass

    from studio.models.hub import HubError, save_token

    token = getpass.getpass("Hub token (read): ") if sys.stdin.isatty() else sys.stdin.readline()
    try:
        user = save_token(token)
    except HubError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"Token stored for {user} where huggingface_hub keeps it (not in the studio's files).")
    return 0
