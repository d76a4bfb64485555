"""`python -m studio.export RUN_DIR`: the command line, its progress line and report."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import time
from typing import Any

from studio import paths
from studio.export.common import ExportError
from studio.export.gguf import GGUF_TYPES, normalize_gguf_type
from studio.export.merge import case_verdict
from studio.export.run import ExportResult, export_run


class _TerminalProgress:
    """A one-line progress bar on a terminal, plain lines when output is redirected."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last = ""
        self.t0 = time.time()
        self.bucket = -1

    def __call__(self, msg: str, frac: float) -> None:
        frac = max(0.0, min(1.0, frac))
        width = 28
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = f"[{bar}] {frac:4.0%} {time.time() - self.t0:5.0f}s  {msg}"
        if self.tty:
            cols = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + line[: cols - 1].ljust(cols - 1))
        else:  # a log file: one line per step, and per 5% within a long step
            stem, bucket = re.sub(r"\d+", "#", msg), int(frac * 20)
            if stem != self.last or bucket != self.bucket:
                self.stream.write(line + "\n")
            self.last, self.bucket = stem, bucket
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def format_report(result: ExportResult) -> str:
    """The CLI's summary of an export (also handy in logs)."""
    lines = [f"Export written to {result.export_dir} in {result.seconds:.0f} s", ""]
    lines.append(result.merge_precision)  # "Merged ...; saved in <dtype>: <why>."
    for chk in (result.merge_check, result.gguf_check):
        if chk is None:
            continue
        lines.append(("PASS " if chk.passed else "DIFF ") + chk.summary)
        for c in chk.cases:
            lines.append(f"  {case_verdict(c)}  {c.prompt[:60]!r}: {c.got[:80]!r}")
        if chk.note:
            lines.append(f"  {chk.note}")
    lines.append("")
    lines.append("Files:")
    lines += [f"  {p}  ({n / 1e6:.1f} MB)" for p, n in result.files]
    lines.append("")
    tmpl = "exact" if result.template_exact else "APPROXIMATED"
    lines.append(f"Ollama ({result.template_family} template, {tmpl}):")
    lines.append(f"  {result.create_command}")
    lines.append(f"  {result.run_command}")
    if result.gguf_route:
        lines.append(f"GGUF route: {result.gguf_route}")
    for n in result.notes:
        lines.append(f"Note: {n}")
    for w in result.warnings:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Keep library progress bars and deprecation chatter out of the CLI's own progress line."""
    import logging
    import warnings

    # bitsandbytes notes a missing optional CPU kernel package; export never runs 4-bit.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _gguf_type(text: str) -> str:
    """--gguf in any case ("Q4_K_M"); argparse then checks it against the choices."""
    try:
        return normalize_gguf_type(text)
    except ExportError:
        return text


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m studio.export",
        description="Export a LoRA Studio run: merged model, GGUF file and Ollama Modelfile.",
    )
    parser.add_argument("run_dir", help="the run folder (runs/<name>-<timestamp>)")
    parser.add_argument(
        "--gguf",
        type=_gguf_type,
        choices=GGUF_TYPES,
        default="f16",
        help="GGUF type (f16). k-quants (q4_K_M, q5_K_M, q6_K) are made from the f16 file by"
        " llama.cpp's quantizer where it loads, else by `ollama create --quantize`",
    )
    parser.add_argument("--out", help="export folder (default: <run>/export, never overwritten)")
    parser.add_argument("--data-dir", help="the studio data dir (~/.lora-studio)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument(
        "--resume",
        metavar="EXPORT_DIR",
        help="finish an export that failed after its merged model was built (the steps not done)",
    )
    args = parser.parse_args(argv)
    if args.data_dir:
        paths.set_data_dir(args.data_dir)
    _quiet_libraries()
    bar = _TerminalProgress()
    try:
        result = export_run(
            args.run_dir, gguf=args.gguf, out=args.out, progress=bar, resume=args.resume
        )
    except ExportError as exc:
        bar.close()
        print(f"Export failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("Export cancelled (a complete merged model is kept for --resume).", file=sys.stderr)
        return 130
    bar.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_report(result))
    ok = result.merge_check.passed and (result.gguf_check is None or result.gguf_check.passed)
    return 0 if ok else 2
