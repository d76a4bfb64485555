"""LoRA Studio desktop app.

Run `python app.py` and open the printed URL (http://127.0.0.1:7860 by default).
Flags: --host, --port, --share, --data-dir, --inbrowser.
"""

from __future__ import annotations

import argparse
import sys
import threading


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA Studio: fine-tune an LLM on one GPU.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--share", action="store_true", help="open a public Gradio link (exposes the app!)"
    )
    parser.add_argument("--data-dir", help="where models/, runs/, datasets/ live (~/.lora-studio)")
    parser.add_argument("--inbrowser", action="store_true", help="open the page in a browser")
    return parser.parse_args(argv)


def _prepare_default_model() -> None:
    """Convert the embedded model in the background on first start; the page is up meanwhile."""
    from studio.models import loader as models

    if models.embedded_ready():
        return

    def report(msg: str, frac: float) -> None:
        print(f"[default model {frac:4.0%}] {msg}", flush=True)

    def work() -> None:
        try:
            models.resolve_model(models.DEFAULT_MODEL, report)
        except Exception as exc:
            print(f"[default model] not ready: {exc}", file=sys.stderr, flush=True)

    threading.Thread(target=work, name="default-model", daemon=True).start()


def _patient_localhost_check() -> None:
    """Gradio gives its own localhost probe 3 s and then refuses to start; on a busy 2-core
    PC (a training run, a compile) the first answer can take longer. Retry for up to 60 s,
    and keep proxies away from the loopback address."""
    import os
    import time

    from gradio import networking

    for var in ("NO_PROXY", "no_proxy"):
        os.environ[var] = ",".join(filter(None, [os.environ.get(var), "127.0.0.1,localhost"]))
    original = networking.url_ok

    def url_ok(url: str) -> bool:
        deadline = time.time() + 60
        while not original(url):
            if time.time() > deadline:
                return False
        return True

    networking.url_ok = url_ok


def _close_on_sigterm() -> None:
    """A SIGTERM, SIGHUP or SIGBREAK (`kill`, a closed terminal or console) closes the app as
    Ctrl-C does: Gradio shuts its server down and the interpreter exits normally, so the exit
    hooks run (a multi-GPU run's processes are stopped at a step and the run recorded,
    `studio.train.jobs.end_children`). Python's default for SIGTERM skips them."""
    import signal

    from studio import compat

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in compat.termination_signals():
        signal.signal(sig, interrupt)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from studio import compat, heavy, paths

    compat.console_safe()  # a cp1252 console must not crash on a Vietnamese run name
    heavy.guard_imports()  # handlers' threads: the first heavy import waits for heavy.ready()

    paths.set_data_dir(args.data_dir)
    if args.share:
        print(
            "WARNING: --share makes this studio reachable from the internet through a public"
            " link. Anyone with the link can read your datasets and start runs.",
            file=sys.stderr,
        )
    if args.host not in {"127.0.0.1", "localhost", "::1"}:
        print(f"WARNING: listening on {args.host}: other machines on the network can reach it.")
    from studio.ui.app import build_app

    demo = build_app()
    _patient_localhost_check()
    print(f"LoRA Studio data dir: {paths.data_dir()}", flush=True)
    _prepare_default_model()
    _close_on_sigterm()
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        inbrowser=args.inbrowser,
        show_error=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
