"""Benchmarks that print measured figures for the studio's speed and memory targets.

Run `python -m studio.bench <command>`; commands:
  data [--rows 100000] [--max-len 512] [--no-tokens] [--keep] [--json FILE]
      Write a generated JSONL of mixed English/Vietnamese/Thai support conversations (~600
      bytes a row) to a temp dir, then load + validate + normalize + PII-scan it (target:
      >= 5,000 rows/s, peak memory < 2 GB) and compute token-length statistics for the same
      rows with the default model's tokenizer (target: < 30 s).

  train [--rows 300] [--steps 20] [--warmup 1] [--max-len 512] [--batch 4]
        [--method lora|qlora] [--lora-dropout 0.05] [--breakdown-steps 8] [--no-breakdown]
        [--json FILE]
      (a) the tutorial recipe (pad to max length, loss on every token, plain Trainer with
      DataCollatorForLanguageModeling) vs (b) the studio's path, same data/model/steps, each
      in its own process, taking turns step by step (a, b, a, b, ...) so that drift on a
      shared machine hits both: real and label-bearing tokens/s, padding share, peak memory,
      final loss, the ratio of the totals and the median and spread of the per-step ratios,
      and the load average while they ran. Then (b) with one of its choices undone
      (padding-free batches; on CPU also TRL's loss head and fp32), each on its own, to show
      what each is worth. On CUDA also MFU and the VRAM estimate next to the measured peak.
  uipath [--rows 300] [--steps 20] [--max-len 512] [--batch 4] [--no-poll] [--json FILE]
      The same rows and settings as train's studio recipe, run through the JobManager as the
      Train tab runs them (its evals, checkpoints, logging, and the UI's 1-second polling and
      chart redraws emulated in-process), vs the studio recipe alone: label-bearing tokens/s,
      the ratio (goal >= 0.8x), where the UI path's time went, the Train tab's final figure.
  app [--no-train]
      Seconds from `python app.py` to the page served, and from a click on Start (Chromium) to
      the first training step shown.
  chat [RUN_DIR] [--ab-tokens 128] [--batch-tokens 32] [--reps 3] [--no-memory]
      Memory with both chat sides ready vs the base alone; time to first token and tokens/s;
      an A/B turn in one batched pass vs A then B, and batch compare prompts/s batched vs
      one prompt at a time (interleaved repetitions: median and spread of the ratios).
  firstrun [--max-steps N] [--val-rows N] [--allow-pii] [--data-dir DIR] [--json FILE]
      The default path headless: the bundled sample redacted (as the Dataset tab's Redact),
      the CPU preset's defaults, no edits. Prints minutes to finish, the did-it-learn
      verdicts, and on the validation split the format rate and ROUGE-L, base vs fine-tune.

  dpo [--rows 16] [--steps 4] [--batch 2] [--max-len 256] [--data FILE] [--json FILE]
      DPO against SFT on the same preference rows through the studio's recipe, each in its
      own process: steps/s and peak memory (RSS on CPU, allocated on CUDA) of each, and what
      a DPO step costs next to an SFT step; prints the machine and the load average.

  gpu [--tiny] [--steps 6] [--json FILE] [--work-dir DIR]
      On one CUDA card, under 8 minutes: the doctor, the self-test with the presets' recipe,
      training speed and memory of the studio against the tutorial on the embedded model and
      random-weight Qwen2.5-1.5B / Llama-3.1-8B shapes, the longest Llama-3.1-8B QLoRA
      sequence in 12 GiB, and the A/B turn; one JSON report. `--tiny`: the same on CPU.

Each command is a module of `studio.tools` with `HELP`, `add_args(parser)` and `run(args)`,
named in COMMANDS; a new benchmark is a new module and one line there.
"""

from __future__ import annotations

import argparse
from types import ModuleType

from studio.tools import app, chat, data, dpo, firstrun, gpu, train, uipath

COMMANDS: dict[str, ModuleType] = {
    "data": data,
    "train": train,
    "uipath": uipath,
    "app": app,
    "chat": chat,
    "firstrun": firstrun,
    "dpo": dpo,
    "gpu": gpu,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m studio.bench", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, tool in COMMANDS.items():
        tool.add_args(sub.add_parser(name, help=tool.HELP))
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    raise SystemExit(main())
