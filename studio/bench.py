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

Each command is a function `bench_<name>(args)` registered in COMMANDS with its own
argument setup, so new benchmarks (train, app) slot in beside `data`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

# --------------------------------------------------------------------------- helpers


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


def _cpu() -> float:
    """CPU seconds this process has used (all threads): a figure the other load on a shared
    machine inflates much less than wall time."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _load() -> str:
    """The 1-minute load average: other work on the machine skews every wall-time figure."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "n/a"


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


# --------------------------------------------------------------------------- data

_EN = [
    "My order has not arrived yet and the tracking page has not changed for four days.",
    "I was charged twice for the same purchase, please refund one of the payments.",
    "The app crashes every time I open the settings page on my phone.",
    "Can I change the delivery address after the order has shipped?",
    "The size I received is too small; how do I exchange it for a larger one?",
    "I cannot log in because the verification code never reaches me.",
    "Is the blue version of this backpack coming back in stock soon?",
    "The discount code from your newsletter says it has expired already.",
]
_VI = [
    "Đơn hàng của tôi vẫn chưa đến, trang theo dõi không cập nhật suốt bốn ngày.",
    "Tôi bị trừ tiền hai lần cho cùng một đơn, vui lòng hoàn lại một khoản.",
    "Ứng dụng bị thoát mỗi khi tôi mở phần cài đặt trên điện thoại.",
    "Tôi có thể đổi địa chỉ giao hàng sau khi đơn đã được gửi đi không?",
    "Áo nhận được bị chật, làm sao để đổi sang cỡ lớn hơn ạ?",
    "Tôi không đăng nhập được vì không nhận được mã xác minh.",
    "Mẫu ba lô màu xanh khi nào có hàng trở lại vậy shop?",
]
_TH = [
    "พัสดุของฉันยังไม่มาถึงเลยและหน้าติดตามไม่อัปเดตมาสี่วันแล้ว",
    "ฉันถูกเรียกเก็บเงินสองครั้งสำหรับคำสั่งซื้อเดียวกัน กรุณาคืนเงินหนึ่งรายการ",
    "แอปปิดตัวเองทุกครั้งที่เปิดหน้าการตั้งค่าบนโทรศัพท์",
    "สามารถเปลี่ยนที่อยู่จัดส่งหลังจากส่งสินค้าแล้วได้ไหมคะ",
    "ได้รับเสื้อไซซ์เล็กเกินไป ต้องการเปลี่ยนเป็นไซซ์ใหญ่ขึ้นค่ะ",
    "ไม่สามารถเข้าสู่ระบบได้เพราะไม่ได้รับรหัสยืนยัน",
]
_ANSWERS = {
    "en": [
        "Thanks for reaching out, we checked your account.",
        "We will follow up within 24 hours by email.",
        "A refund has been requested and should arrive in 5 to 7 days.",
        "Please restart the app after updating it to the latest version.",
    ],
    "vi": [
        "Cảm ơn bạn đã liên hệ, chúng tôi đã kiểm tra tài khoản.",
        "Chúng tôi sẽ phản hồi trong vòng 24 giờ qua email.",
        "Yêu cầu hoàn tiền đã được gửi, bạn sẽ nhận lại trong 5 đến 7 ngày.",
        "Vui lòng khởi động lại ứng dụng sau khi cập nhật phiên bản mới nhất.",
    ],
    "th": [
        "ขอบคุณที่ติดต่อเรา เราได้ตรวจสอบบัญชีของคุณแล้ว",
        "เราจะติดต่อกลับภายใน 24 ชั่วโมงทางอีเมล",
        "เราได้ส่งคำขอคืนเงินแล้ว คุณจะได้รับเงินคืนภายใน 5 ถึง 7 วัน",
        "กรุณาเปิดแอปใหม่หลังจากอัปเดตเป็นเวอร์ชันล่าสุด",
    ],
}
_SYSTEM = (
    "You are the support assistant of Lotus Shop. Reply with JSON: category, priority, answer."
)
_CATEGORIES = ("billing", "shipping", "account", "returns", "technical", "product")
_PII = (
    " You can email me at linh.nguyen{n}@example.com.",
    " Call me on 0912 345 {n:03d}.",
    " โทร 081-234-5{n:03d} ได้เลยค่ะ",
    " Gọi cho tôi số +84 912 345 {n:03d} nhé.",
)


def generate_rows(n: int, seed: int = 7) -> Any:
    """Yield n chat rows mixing English, Vietnamese and Thai; about 1 in 20 carries PII.

    Every user turn and reply is distinct (it carries its order number), so no cache or
    de-duplication makes the figures look better than a real dataset would.
    """
    rng = random.Random(seed)
    pools = (("en", _EN), ("vi", _VI), ("th", _TH))
    for i in range(n):
        lang, pool = pools[i % 3]
        user = " ".join(rng.sample(pool, k=min(len(pool), rng.randint(1, 3))))
        user += f" (order #{100000 + i})"
        if rng.random() < 0.05:
            user += rng.choice(_PII).format(n=i % 1000)
        reply = {
            "category": rng.choice(_CATEGORIES),
            "priority": rng.choice(("low", "medium", "high")),
            "answer": " ".join(rng.sample(_ANSWERS[lang], k=2)) + f" (ref {100000 + i})",
        }
        messages = []
        if rng.random() < 0.7:
            messages.append({"role": "system", "content": _SYSTEM})
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": json.dumps(reply, ensure_ascii=False)})
        yield {"messages": messages}


def write_jsonl(path: Path, n: int) -> int:
    """Write the generated rows; returns the file size in bytes."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in generate_rows(n):
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
    return path.stat().st_size


def bench_data(args: argparse.Namespace) -> int:
    from studio.data import load as data

    try:
        from studio.data import pii
    except ImportError:
        pii = None

    tmp = Path(tempfile.mkdtemp(prefix="lora-studio-bench-"))
    try:
        path = tmp / "bench.jsonl"
        t0 = time.perf_counter()
        size = write_jsonl(path, args.rows)
        print(
            f"generated {args.rows:,} rows (EN/VI/TH), {size / 1e6:.1f} MB JSONL in"
            f" {time.perf_counter() - t0:.1f} s: {path} (load average {_load()})",
            flush=True,
        )

        with PeakRSS() as mem:
            c0 = _cpu()
            t0 = time.perf_counter()
            report = data.load_dataset_file(path)
            t_load = time.perf_counter() - t0
            t_pii = 0.0
            pii_note = "skipped (studio.pii is not available)"
            if pii is not None:
                t1 = time.perf_counter()
                scan = pii.scan_rows(report.rows, report.row_numbers)
                t_pii = time.perf_counter() - t1
                pii_note = f"{len(scan.findings):,} findings in {len(scan.rows_with_pii):,} rows"
        total = t_load + t_pii
        cpu = _cpu() - c0
        results: dict[str, Any] = {
            "machine": _machine(),
            "rows": report.total,
            "mb": round(size / 1e6, 1),
            "load_average_at_start": _load(),
            "load_validate_normalize_s": round(t_load, 2),
            "pii_scan_s": round(t_pii, 2),
            "rows_per_s": round(report.total / max(total, 1e-9)),
            "cpu_s": round(cpu, 2),
            "peak_rss_mb": round(mem.peak_bytes / 2**20),
        }
        print(
            f"load+validate+normalize: {t_load:.2f} s ({report.valid:,} valid,"
            f" {report.invalid:,} invalid)"
        )
        print(f"PII scan: {t_pii:.2f} s, {pii_note}")
        print(
            f"load+validate+normalize+PII-scan: {report.total:,} rows in {total:.2f} s ="
            f" {report.total / max(total, 1e-9):,.0f} rows/s (target >= 5,000 rows/s);"
            f" CPU {cpu:.2f} s"
        )
        print(
            f"peak memory: {_mb(mem.peak_bytes)} RSS (at start {_mb(mem.start_bytes)};"
            f" target < 2,048 MB)",
            flush=True,
        )

        if not args.no_tokens:
            results.update(_bench_token_stats(report.rows, args.max_len))
        if args.keep:
            print(f"kept {path}")
        _write_results(args, "data", results)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _bench_token_stats(rows: list[dict[str, Any]], max_len: int) -> dict[str, Any]:
    """Token-length statistics of `rows` with the default model's tokenizer, timed."""
    from studio.data.tokens import token_stats
    from studio.models import loader as models

    resolved = models.resolve_model(models.DEFAULT_MODEL)
    tok = models.load_tokenizer(resolved.path)
    c0 = _cpu()
    t0 = time.perf_counter()
    stats = token_stats(rows, tok, max_len)
    t_tok = time.perf_counter() - t0
    print(
        f"token lengths: {stats['rows']:,} rows in {t_tok:.2f} s (target < 30 s;"
        f" CPU {_cpu() - c0:.2f} s on {os.cpu_count()} cores, load {_load()});"
        f" p50 {stats['p50']}, p95 {stats['p95']}, max {stats['max']},"
        f" {stats['over_max_len']:,} rows over {max_len} tokens"
    )
    return {
        "token_stats_s": round(t_tok, 2),
        "token_p50": stats["p50"],
        "token_p95": stats["p95"],
        "token_max": stats["max"],
    }


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=100_000, help="rows to generate (100000)")
    p.add_argument("--max-len", type=int, default=512, help="max sequence length (512)")
    p.add_argument("--no-tokens", action="store_true", help="skip the token-length part")
    p.add_argument("--keep", action="store_true", help="keep the generated file")
    p.add_argument("--json", help="also write the results to this JSON file")


# --------------------------------------------------------------------------- train


def bench_rows(n: int, seed: int = 11) -> list[dict[str, Any]]:
    """The bundled sample (90 to ~430 tokens a row), redacted, repeated and shuffled to n rows.

    Redacted because the sample carries planted (fake) PII and the benchmark trains without
    `prepare_run`'s gate: it trains on what a run that passed the gate would see.
    """
    from studio.data.load import SAMPLE_DATASET
    from studio.data.pii import redact_rows

    text = SAMPLE_DATASET.read_text(encoding="utf-8")
    base = [json.loads(line) for line in text.split("\n") if line.strip()]  # JSONL: "\n" only
    base = redact_rows(base)
    rows = [{"messages": [dict(m) for m in base[i % len(base)]["messages"]]} for i in range(n)]
    random.Random(seed).shuffle(rows)
    return rows


class _TokenCounter:
    """Wraps a collator and counts what each batch holds: slots, real tokens, labelled ones."""

    def __init__(self, collate: Callable[[list], dict], pad_id: int | None) -> None:
        self.collate = collate
        self.pad_id = pad_id
        self.batches: list[dict[str, int]] = []

    def __call__(self, features: list) -> dict:
        batch = self.collate(features)
        ids, labels = batch["input_ids"], batch["labels"]
        slots = int(ids.numel())
        # Padding-free batches have no attention mask: every slot is a real token.
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else slots
        self.batches.append({"slots": slots, "real": real, "labelled": int((labels != -100).sum())})
        return batch


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), so RSS can fall again."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _tutorial_trainer(cfg: Any, model_path: Path, tok: Any, rows: list, device: str, out: Path):
    """(a) The tutorial recipe: pad every row to max length, loss on every token, plain
    Trainer with DataCollatorForLanguageModeling (which also masks every EOS when pad == eos).
    Precision as the tutorials had it: fp32 on CPU (Trainer's default there), the card's
    16-bit type on CUDA."""
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from studio.data.chat_format import render
    from studio.models.precision import precision
    from studio.train import recipe

    texts = [render(tok, r["messages"]) for r in rows]
    enc = tok(texts, padding="max_length", truncation=True, max_length=cfg.max_seq_len)
    ds = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    with mock.patch.dict(os.environ, {"LORA_STUDIO_CPU_FP32": "1"}):  # no effect on CUDA
        dtype = precision(device).torch_dtype
        model = recipe.load_base_model(cfg, model_path, device)
    model = get_peft_model(model, recipe.build_peft_config(cfg, model))
    counter = _TokenCounter(DataCollatorForLanguageModeling(tok, mlm=False), tok.pad_token_id)
    args = TrainingArguments(
        output_dir=str(out / "tutorial"),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=device == "cuda" and str(dtype) == "torch.bfloat16",
        fp16=device == "cuda" and str(dtype) == "torch.float16",
        seed=cfg.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=counter)
    return trainer, counter, _precision(dtype, device)


def _precision(dtype: Any, device: str) -> str:
    """How a recipe computes, in words for the printed table."""
    name = str(dtype).replace("torch.", "")
    if name == "float32":
        return "fp32"
    return f"{name} base + autocast" if device == "cpu" else name


def _studio_trainer(
    cfg: Any,
    model_path: Path,
    tok: Any,
    rows: list,
    device: str,
    out: Path,
    *,
    fp32: bool = False,
    padding_free: bool | None = None,
    compact_head: bool = True,
):
    """(b) The studio's own path: the same builders the Train tab uses. `fp32`,
    `padding_free` and `compact_head=False` each undo one of its choices, for the breakdown of
    where the speed comes from."""
    from studio.models.precision import precision
    from studio.train import recipe
    from studio.train.prepare import tokenize_rows

    tokenized, _ = tokenize_rows(tok, rows, cfg)
    with mock.patch.dict(os.environ, {"LORA_STUDIO_CPU_FP32": "1"} if fp32 else {}):
        dtype = precision(device).torch_dtype
        model = recipe.load_base_model(cfg, model_path, device)
        if padding_free is None:
            padding_free = recipe.padding_free_ok(model)
        args = recipe.build_training_args(
            cfg, out / "studio", device, False, False, padding_free=padding_free
        )
    args.save_strategy = "no"
    args.max_steps = cfg.max_steps
    trainer = recipe.build_trainer(cfg, model, tok, args, device, tokenized)
    trainer.compact_head = compact_head and trainer.compact_head
    counter = _TokenCounter(trainer.data_collator, tok.pad_token_id)
    trainer.data_collator = counter
    batches = "padding-free" if padding_free else "length-grouped"
    head = "compact head" if trainer.compact_head else "TRL's fused head"
    return trainer, counter, f"{_precision(dtype, device)}, {batches}, {head}"


# The breakdown: (b) with one of its choices undone, and what that choice is.
_UNDONE = [
    ("studio_padding_free", "(b) padding-free", {"padding_free": True}, "length-grouped batches"),
    ("studio_trl_head", "(b) TRL's head", {"compact_head": False}, "the compact CPU loss head"),
    ("studio_fp32", "(b) in fp32", {"fp32": True}, "bf16 on a CPU with native bf16"),
]


_BUILDERS = {"tutorial": _tutorial_trainer, "studio": _studio_trainer}


def _recipe_worker(job: dict[str, Any], turns: list[Any], out: Any) -> None:
    """One recipe in its own process (own accelerate state, own memory peak): build its
    trainer, then train, taking a turn per optimizer step with the other recipes' processes
    (`turns`: one semaphore each), so that machine drift hits every recipe alike."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from studio import paths
    from studio.config import RunConfig
    from studio.models import loader as models

    paths.set_data_dir(job["data_dir"])
    cfg = RunConfig.from_dict(job["cfg"])
    tok = models.load_tokenizer(job["model_path"])
    rows = bench_rows(job["rows"])
    build = dict(_BUILDERS)[job["builder"]]
    torch.manual_seed(cfg.seed)
    trainer, counter, how = build(
        cfg, Path(job["model_path"]), tok, rows, job["device"], Path(job["tmp"]), **job["undo"]
    )
    me, n = job["index"], len(turns)
    times: list[float] = []

    class Turn(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            turns[me].acquire(timeout=3600)  # a crashed neighbour must not hang this one
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            turns[(me + 1) % n].release()

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Turn())
    _release_memory()
    with PeakRSS() as rss:
        result = trainer.train()
    per = max(1, len(counter.batches) // max(1, len(times)))
    steps = [
        {"seconds": t, **{k: sum(b[k] for b in counter.batches[i * per : (i + 1) * per])
                          for k in ("slots", "real", "labelled")}}
        for i, t in enumerate(times)
    ]  # fmt: skip
    figures: dict[str, Any] = {
        "precision": how,
        "final_loss": round(float(result.training_loss), 4),
    }
    if job["device"] == "cuda":
        from studio.train.loop import memory_now

        figures["peak_memory_mb"], figures["memory_kind"] = memory_now("cuda")
        figures.update(_cuda_extras(cfg, Path(job["model_path"]), trainer, _sum_steps(steps[1:])))
    else:
        figures["peak_memory_mb"] = round(rss.peak_bytes / 2**20, 1)
        figures["memory_kind"] = "process RSS peak"
    out.put((job["key"], figures, steps))


def _sum_steps(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput figures over timed steps."""
    secs = sum(s["seconds"] for s in steps) or 1e-9
    real, slots = sum(s["real"] for s in steps), sum(s["slots"] for s in steps)
    return {
        "steps_timed": len(steps),
        "seconds": round(secs, 2),
        "tokens_per_s": round(real / secs, 1),
        "labelled_tokens_per_s": round(sum(s["labelled"] for s in steps) / secs, 1),
        "padding_share": round(1 - real / slots, 3) if slots else 0.0,
    }


def _run_interleaved(jobs: list[dict[str, Any]], warm: int) -> dict[str, dict[str, Any]]:
    """Run the jobs' recipes in processes that take turns step by step (a, b, a, b, ...);
    returns key -> figures over the steps after `warm`, plus the per-step list and the load
    average sampled while they ran."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    turns = [ctx.Semaphore(1 if i == 0 else 0) for i in range(len(jobs))]
    out = ctx.Queue()
    # daemon: a benchmark stopped with Ctrl-C takes its recipes' processes with it
    procs = [
        ctx.Process(target=_recipe_worker, args=(job, turns, out), daemon=True) for job in jobs
    ]
    for p in procs:
        p.start()
    found: dict[str, dict[str, Any]] = {}
    loads: list[float] = []
    while len(found) < len(jobs):
        with contextlib.suppress(Exception):
            key, figures, steps = out.get(timeout=5)
            timed = steps[warm:]
            found[key] = {**figures, **_sum_steps(timed), "per_step": timed}
        with contextlib.suppress(OSError):
            loads.append(os.getloadavg()[0])
        if len(found) < len(jobs) and any(p.exitcode not in (None, 0) for p in procs):
            for p in procs:
                p.terminate()
            raise RuntimeError("a benchmark recipe's process failed (its traceback is above)")
    for p in procs:
        p.join()
    for figures in found.values():
        figures["load_average_during"] = _spread(loads)
    return found


def _spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles and range of a list of figures."""
    import statistics

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


def bench_train(args: argparse.Namespace) -> int:
    """(a) the tutorial recipe vs (b) the studio path, interleaved step by step in two
    processes; then (b) with one choice undone, each on its own."""
    from studio import paths
    from studio.config import RunConfig
    from studio.models import loader as models
    from studio.train.prepare import resolve_device

    resolved = models.resolve_model(args.model)
    cfg = RunConfig(
        base_model=str(resolved.path),
        method=args.method,
        max_seq_len=args.max_len,
        batch_size=args.batch,
        grad_accum=1,
        max_steps=args.steps + args.warmup,
        learning_rate=2e-4,
        warmup_ratio=0.0,
        target_modules="qv",
        lora_dropout=args.lora_dropout,
        device=args.device,
    ).validate()
    device, why = resolve_device(cfg)
    print(
        f"train benchmark: {resolved.name} ({cfg.method}), {args.rows} rows, max length"
        f" {cfg.max_seq_len}, batch {cfg.batch_size}, {args.warmup} warm-up + {args.steps}"
        f" timed optimizer steps each, (a) and (b) interleaved step by step; lora_dropout"
        f" {cfg.lora_dropout}; device {why}; {os.cpu_count()} cores, load {_load()}",
        flush=True,
    )
    results: dict[str, Any] = {
        "machine": _machine(),
        "model": resolved.name,
        "method": cfg.method,
        "rows": args.rows,
        "max_len": cfg.max_seq_len,
        "batch": cfg.batch_size,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "lora_dropout": cfg.lora_dropout,
        "load_average_at_start": _load(),
    }
    tmp = Path(tempfile.mkdtemp(prefix="lora-studio-bench-train-"))
    base = {"cfg": cfg.to_dict(), "model_path": str(resolved.path), "rows": args.rows}
    base |= {"device": device, "tmp": str(tmp), "data_dir": str(paths.data_dir())}
    try:
        pair = [
            {**base, "key": key, "builder": key, "undo": {}, "index": i}
            for i, key in enumerate(("tutorial", "studio"))
        ]
        results.update(_run_interleaved(pair, args.warmup))
        for key, label in (("tutorial", "(a) tutorial"), ("studio", "(b) studio")):
            _print_recipe(label, results[key])
        _compare_recipes(results)
        breakdown = cfg.replace(max_steps=args.breakdown_steps + args.warmup).to_dict()
        for key, label, undo, _ in _UNDONE if args.breakdown else []:
            if device == "cpu" or key == "studio_padding_free":
                job = {**base, "cfg": breakdown, "key": key, "builder": "studio"}
                results.update(_run_interleaved([{**job, "undo": undo, "index": 0}], args.warmup))
                _print_recipe(label, results[key])
        _compare_breakdown(results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_results(args, "train", results)
    return 0


def _print_recipe(label: str, r: dict[str, Any]) -> None:
    print(
        f"{label:17s}: {r['tokens_per_s']:7.1f} real tokens/s,"
        f" {r['labelled_tokens_per_s']:7.1f} label-bearing tokens/s"
        f" ({r['steps_timed']} steps, {r['seconds']:.1f} s),"
        f" padding {r['padding_share']:.0%}, peak"
        f" {r['peak_memory_mb']:,.0f} MB ({r['memory_kind']}), final loss"
        f" {r['final_loss']}; {r['precision']}",
        flush=True,
    )


def _compare_recipes(results: dict[str, Any]) -> None:
    """(b) against (a): the ratio of the totals, and the median and spread of the per-step
    ratios (step i of (b) against step i of (a), run back to back)."""
    a, b = results["tutorial"], results["studio"]
    results["ratio_tokens_per_s"] = round(b["tokens_per_s"] / a["tokens_per_s"], 2)
    results["ratio_labelled_tokens_per_s"] = round(
        b["labelled_tokens_per_s"] / a["labelled_tokens_per_s"], 2
    )
    results["ratio_step_time"] = round(a["seconds"] / b["seconds"], 2)

    def rate(s: dict[str, Any], k: str) -> float:
        return s[k] / max(s["seconds"], 1e-9)

    pairs = list(zip(a["per_step"], b["per_step"], strict=False))
    per_step = {
        k: _spread([rate(sb, k) / max(rate(sa, k), 1e-9) for sa, sb in pairs])
        for k in ("labelled", "real")
    }
    results["ratio_per_step_labelled"], results["ratio_per_step_real"] = per_step.values()
    lab, load = per_step["labelled"], a.get("load_average_during") or {}
    print(
        f"ratio (b)/(a): {results['ratio_labelled_tokens_per_s']}x label-bearing tokens/s"
        f" (goal >= 3x), {results['ratio_tokens_per_s']}x real tokens/s,"
        f" {results['ratio_step_time']}x faster per optimizer step"
    )
    if lab:
        print(
            f"per-step ratio, label-bearing ({lab['n']} interleaved pairs): median"
            f" {lab['median']}x, IQR {lab['q1']}-{lab['q3']}x, range {lab['min']}-{lab['max']}x;"
            f" real tokens median {per_step['real']['median']}x; load average during the run"
            f" {load.get('median', 'n/a')} (range {load.get('min', '?')}-{load.get('max', '?')})"
        )


def _compare_breakdown(results: dict[str, Any]) -> None:
    """(b) against each run with one of its choices undone (run after the pair, on its own)."""
    b = results["studio"]
    for key, label, _, choice in _UNDONE:
        if key in results:
            ratio = round(b["tokens_per_s"] / results[key]["tokens_per_s"], 2)
            results[f"gain_over_{key}"] = ratio
            print(f"breakdown: {choice}: (b) runs {ratio}x the real tokens/s of {label}")


def _cuda_extras(cfg: Any, model_path: Path, trainer: Any, r: dict[str, Any]) -> dict[str, Any]:
    """MFU and the VRAM estimate next to the measured peak (CUDA only)."""
    import torch

    from studio.models.loader import logical_params

    n_params = logical_params(trainer.model)
    name = torch.cuda.get_device_name(0)
    peak_tflops = _PEAK_BF16_TFLOPS.get(next((k for k in _PEAK_BF16_TFLOPS if k in name), ""), 0)
    extras: dict[str, Any] = {"gpu": name, "params": n_params}
    if peak_tflops:
        extras["mfu"] = round(4 * n_params * r["tokens_per_s"] / (peak_tflops * 1e12), 4)
    from studio.hardware import vram

    extras["vram_measured_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    try:
        est = vram.estimate(vram.model_shape(str(model_path)), vram.run_settings(cfg))
        # allocated: what max_memory_allocated counts (no CUDA context or allocator slack)
        extras["vram_estimate_mb"] = round(est.allocated_bytes / 2**20)
        extras["vram_estimate_error_share"] = round(
            est.allocated_bytes / torch.cuda.max_memory_allocated() - 1, 3
        )
    except (vram.ModelShapeError, ValueError) as exc:  # a bonus here; say why it is missing
        extras["vram_estimate_error"] = str(exc)
    return extras


# Dense bf16 peak of common cards (TFLOP/s), for MFU.
_PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "4090": 165.2,
    "4080": 97.5,
    "4070": 58.3,
    "4060": 30.2,
    "3090": 71.0,
    "3060": 25.4,
}


def _machine() -> str:
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


def _write_results(args: argparse.Namespace, name: str, results: dict[str, Any]) -> None:
    if getattr(args, "json", None):
        path = Path(args.json)
        path.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
        print(f"results written to {path}")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=300, help="rows of varied length (300)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per recipe (20)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps per recipe (1)")
    p.add_argument(
        "--breakdown-steps", type=int, default=8, help="timed steps per breakdown run (8)"
    )
    p.add_argument(
        "--lora-dropout", type=float, default=0.05, help="LoRA dropout of every recipe (0.05)"
    )
    p.add_argument("--max-len", type=int, default=512, help="max sequence length (512)")
    p.add_argument("--batch", type=int, default=4, help="rows per step (4)")
    p.add_argument("--method", choices=("lora", "qlora"), default="lora")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument(
        "--no-breakdown",
        dest="breakdown",
        action="store_false",
        help="skip the runs of (b) with one choice undone (padding-free batches, fp32 on CPU)",
    )
    p.add_argument("--json", help="also write the results to this JSON file")


# --------------------------------------------------------------------------- uipath


class _Phases:
    """A TrainerCallback's clock of a run: time in optimizer steps, in evals, in checkpoint
    saves (each measured from the event before it to its own end; an eval logs its metrics
    before `on_evaluate`, so a log does not restart the clock)."""

    def __init__(self) -> None:
        self.spent = {"steps": 0.0, "evals": 0.0, "saves": 0.0}
        self.count = {"steps": 0, "evals": 0, "saves": 0}
        self.first_step_s = 0.0
        self._last = time.perf_counter()

    def mark(self, kind: str | None) -> None:
        now = time.perf_counter()
        if kind is not None:
            self.spent[kind] += now - self._last
            self.count[kind] += 1
            if kind == "steps" and self.count[kind] == 1:
                self.first_step_s = now - self._last
        self._last = now

    def callback(self) -> Any:
        from transformers import TrainerCallback

        phases = self

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                phases.mark(None)

            def on_step_end(self, args, state, control, **kw):
                phases.mark("steps")

            def on_evaluate(self, args, state, control, **kw):
                phases.mark("evals")

            def on_save(self, args, state, control, **kw):
                phases.mark("saves")

        return Clock()


def _poll_like_the_ui(stop: threading.Event, counts: dict[str, int]) -> None:
    """What the Train tab's 1-second timer does in the app's process: copy the snapshot and,
    when it changed, rebuild the progress text and (when its points changed) the loss figure,
    serialised as Gradio sends it."""
    from studio.plots import loss_figure
    from studio.train.jobs import get_manager

    seen, drawn = -1, ""
    while not stop.wait(1.0):
        snap = get_manager().snapshot()
        counts["polls"] += 1
        if snap.version == seen:
            continue
        seen = snap.version
        _ = "\n".join(snap.log_lines[-200:])
        curve = f"{snap.run_dir}:{len(snap.history)}"
        if curve != drawn:
            drawn = curve
            loss_figure({snap.run_name: snap.history}).to_json()
            counts["redraws"] += 1


def _ui_run(cfg: Any, poll: bool) -> tuple[Path, _Phases, dict[str, int]]:
    """One run through the JobManager (the Train tab's path), with the UI's polling."""
    from studio.train.jobs import get_manager

    phases, counts, stop = _Phases(), {"polls": 0, "redraws": 0}, threading.Event()
    poller = threading.Thread(target=_poll_like_the_ui, args=(stop, counts), daemon=True)
    if poll:
        poller.start()
    try:
        run_dir = get_manager().start(cfg, extra_callbacks=[phases.callback()])
        snap = get_manager().wait()
    finally:
        stop.set()
    if snap.state != "completed":
        raise RuntimeError(f"the UI-path run ended {snap.state}: {snap.message}")
    return run_dir, phases, counts


def bench_uipath(args: argparse.Namespace) -> int:
    """The same rows and settings as `bench train`'s studio recipe, run through the
    JobManager as the Train tab runs them (the run's own eval, checkpoints and logging, the
    1-second polling), against the studio recipe alone: label-bearing tokens/s and where the
    rest of the time goes."""
    from studio import paths
    from studio.config import RunConfig
    from studio.models import loader as models
    from studio.train.prepare import resolve_device

    resolved = models.resolve_model(args.model)
    home = Path(tempfile.mkdtemp(prefix="lora-studio-bench-uipath-"))
    (home / "models").symlink_to(paths.models_dir(), target_is_directory=True)
    data = home / "rows.jsonl"
    data.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in bench_rows(args.rows))
    )
    paths.set_data_dir(home)
    cfg = RunConfig(
        run_name="uipath", base_model=str(resolved.path), dataset_path=str(data),
        max_seq_len=args.max_len, batch_size=args.batch, grad_accum=1,
        max_steps=args.steps + 1, learning_rate=2e-4, warmup_ratio=0.0, target_modules="qv",
        allow_pii=True,  # bench_rows are redacted already
    ).validate()  # fmt: skip
    print(
        f"UI-path benchmark: {resolved.name}, {args.rows} rows, max length {cfg.max_seq_len},"
        f" batch {cfg.batch_size}, {cfg.max_steps} steps, default eval/checkpoint/logging;"
        f" polling {'on' if args.poll else 'off'}; load {_load()}",
        flush=True,
    )
    results: dict[str, Any] = {"machine": _machine(), "load_average_at_start": _load()}
    try:
        studio = _run_interleaved(
            [{"cfg": cfg.to_dict(), "model_path": str(resolved.path), "rows": args.rows,
              "device": resolve_device(cfg)[0], "tmp": str(home),
              "data_dir": str(home), "key": "studio", "builder": "studio", "undo": {},
              "index": 0}], 1,
        )["studio"]  # fmt: skip
        results["studio_recipe"] = {k: v for k, v in studio.items() if k != "per_step"}
        run_dir, phases, counts = _ui_run(cfg, args.poll)
        results["ui_path"] = _ui_figures(run_dir, phases, counts)
    finally:
        paths.set_data_dir(None)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    ui, b = results["ui_path"], results["studio_recipe"]
    results["ratio"] = round(ui["labelled_tokens_per_s"] / b["labelled_tokens_per_s"], 2)
    print(
        f"studio recipe alone: {b['labelled_tokens_per_s']:.1f} label-bearing tokens/s;"
        f" UI path: {ui['labelled_tokens_per_s']:.1f} ({results['ratio']}x, goal >= 0.8x);"
        f" the Train tab's final figure {ui['shown_avg_tokens_per_s']} trained tokens/s"
    )
    print(
        f"UI path after step 1: {ui['wall_s']:.1f} s = steps {ui['steps_s']:.1f} s +"
        f" {ui['evals']} evals {ui['evals_s']:.1f} s + {ui['saves']} checkpoints"
        f" {ui['saves_s']:.1f} s + other {ui['other_s']:.1f} s; {counts['polls']} polls,"
        f" {counts['redraws']} chart redraws; load {_load()}"
    )
    _write_results(args, "uipath", results)
    return 0


def _ui_figures(run_dir: Path, phases: _Phases, counts: dict[str, int]) -> dict[str, Any]:
    """The UI-path run's throughput after its first step (the recipe's warm-up step is not
    counted either), from its own log, and where its time went."""
    from studio import runs

    log = runs.load_log(run_dir)
    train = [e for e in log if e.get("kind") == "train"]
    ends = [e["time"] for e in log if e.get("event") == "message" and "Saving" in e["text"]]
    wall = ends[-1] - train[0]["time"]
    labelled = train[-1]["label_tokens"] - train[0]["label_tokens"]
    steps_s = phases.spent["steps"] - phases.first_step_s
    rest = phases.spent["evals"] + phases.spent["saves"]
    return {
        "labelled_tokens_per_s": round(labelled / wall, 1),
        "shown_avg_tokens_per_s": train[-1].get("avg_tokens_per_s"),
        "wall_s": round(wall, 2),
        "steps_s": round(steps_s, 2),
        "evals": phases.count["evals"],
        "evals_s": round(phases.spent["evals"], 2),
        "saves": phases.count["saves"],
        "saves_s": round(phases.spent["saves"], 2),
        "other_s": round(wall - steps_s - rest, 2),
        **counts,
    }


def _uipath_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=300, help="rows of varied length (300)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (20)")
    p.add_argument("--max-len", type=int, default=512, help="max sequence length (512)")
    p.add_argument("--batch", type=int, default=4, help="rows per step (4)")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--no-poll", dest="poll", action="store_false", help="no 1-second polling")
    p.add_argument("--keep", action="store_true", help="keep the run folder")
    p.add_argument("--json", help="also write the results to this JSON file")


# --------------------------------------------------------------------------- app


def bench_app(args: argparse.Namespace) -> int:
    """Seconds from `python app.py` to the page being served, and from Start to step 1.

    The second figure clicks Start in Chromium (Playwright + /usr/bin/chromium) and waits
    for step 1 of a 2-step run; without them it says it skipped.
    """
    import socket
    import subprocess
    import urllib.request

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(root / "app.py"), "--port", str(port)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    results: dict[str, Any] = {"machine": _machine()}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                print("app.py exited before serving the page", file=sys.stderr)
                return 1
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        results["page_served_s"] = round(time.perf_counter() - t0, 2)
        print(f"python app.py -> page served: {results['page_served_s']:.2f} s (target < 10 s)")
        if not args.no_train:
            results.update(_start_to_first_step(url, args))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    _write_results(args, "app", results)
    return 0


def _start_to_first_step(url: str, args: argparse.Namespace) -> dict[str, Any]:
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not chromium.exists():
        print("Start -> first step: skipped (needs Playwright and /usr/bin/chromium)")
        return {}
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=flags)
        page = browser.new_page()
        page.goto(url)
        page.get_by_role("tab", name="Train", exact=True).click()
        page.get_by_text("Advanced settings").click()
        for elem_id, value in (("train-max-steps", "2"), ("train-max-seq-len", "128")):
            box = page.locator(f"#{elem_id}").locator("input, textarea").first
            box.fill(value)
            box.press("Tab")
        allow = page.locator("#train-allow-pii input")
        if allow.count():
            allow.check()
        page.wait_for_timeout(1000)
        t0 = time.perf_counter()
        page.locator("#train-start").click()
        page.locator("#train-progress").get_by_text("Step 1/").wait_for(timeout=600_000)
        secs = round(time.perf_counter() - t0, 2)
        page.locator("#train-progress").get_by_text("Completed").wait_for(timeout=600_000)
        browser.close()
    print(f"click Start -> first training step shown: {secs:.2f} s (model load included)")
    return {"start_to_first_step_s": secs}


def _app_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="the studio data dir to start the app with")
    p.add_argument("--no-train", action="store_true", help="only time the page start-up")
    p.add_argument("--json", help="also write the results to this JSON file")


# --------------------------------------------------------------------------- chat

_CHAT_PROMPTS = [
    "My parcel has not arrived after two weeks. What should I do?",
    "Tôi bị trừ tiền hai lần cho cùng một đơn hàng, làm sao để được hoàn tiền?",
    "How do I reset my password if the email never arrives?",
]


def bench_chat(args: argparse.Namespace) -> int:
    """Memory with both chat sides ready vs the base alone, and per-side speed."""
    from studio.chat import measure

    result = measure.bench_chat(
        args.model,
        args.run_dir or measure.newest_run(),
        _CHAT_PROMPTS,
        max_new_tokens=args.tokens,
        ab_tokens=args.ab_tokens,
        batch_tokens=args.batch_tokens,
        reps=args.reps,
        memory=not args.no_memory,
    )
    result["machine"] = _machine()
    for key, value in result.items():
        if key != "batching":
            print(f"{key}: {value}")
    print("\n".join(measure.batching_lines(result["batching"])))
    _write_results(args, "chat", result)
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run_dir", nargs="?", help="a run or adapter folder (default: the newest run with one)"
    )
    p.add_argument("--model", help="base model (default: the run's own)")
    p.add_argument("--tokens", type=int, default=64, help="max new tokens per answer (64)")
    p.add_argument("--ab-tokens", type=int, default=128, help="new tokens per A/B turn (128)")
    p.add_argument("--batch-tokens", type=int, default=32, help="batch compare tokens (32)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (3)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory figures")
    p.add_argument("--json", help="also write the results to this JSON file")


# --------------------------------------------------------------------------- firstrun


def _firstrun_dataset(allow_pii: bool) -> tuple[Path, str]:
    """The bundled sample as a new user trains it: a redacted copy (the Dataset tab's Redact,
    `studio.data.pii.write_cleaned`), or the sample itself with allow_pii."""
    from studio.data import load as data

    if allow_pii:
        return data.SAMPLE_DATASET, "the bundled sample (PII allowed)"
    from studio.data import pii

    report = data.load_dataset_file(data.SAMPLE_DATASET)
    cleaned = pii.write_cleaned(report.rows, data.SAMPLE_DATASET, "redact")
    return cleaned.path, f"a redacted copy of the bundled sample ({cleaned.findings_fixed} fixed)"


def _firstrun_config(dataset: Path, allow_pii: bool, max_steps: int) -> tuple[Any, str]:
    """The default run as the Train tab fills it with no edits: the CPU preset's band defaults
    for the default model, sized to the dataset by `studio.train.plan.plan_run` where it
    exists, the RunConfig defaults for everything else. Returns the config and the plan's
    line (so the figures always say which recipe they measured)."""
    from studio.config import RunConfig
    from studio.hardware import presets
    from studio.hardware.vram import model_shape
    from studio.models import loader

    cpu = next(p for p in presets.load_presets().presets.values() if p.kind == "cpu")
    n_params = model_shape(loader.DEFAULT_MODEL).n_params
    known = set(RunConfig.__dataclass_fields__)
    settings = {k: v for k, v in presets.defaults_for(cpu, n_params).items() if k in known}
    cfg = RunConfig(run_name="firstrun", dataset_path=str(dataset), allow_pii=allow_pii, **settings)
    try:
        from studio.train.plan import plan_run

        tok = loader.load_tokenizer(loader.resolve_model(cfg.base_model).path)
        planned = plan_run(cfg, tok)
        cfg, line = cfg.replace(**planned.settings), planned.line or "; ".join(planned.problems)
    except (ImportError, AttributeError, TypeError) as exc:  # no planner: the band's values
        line = f"no recipe plan ({exc})"
    if max_steps:
        cfg = cfg.replace(max_steps=max_steps)
    return cfg.validate(), line


def _firstrun_scores(run_dir: Path, val_rows: int) -> dict[str, Any]:
    """Base vs fine-tune on the run's validation split, loaded as the Chat tab loads it:
    the share of answers in the dataset's format, complete JSON, and mean ROUGE-L."""
    from studio.chat import evaluate
    from studio.chat.engine import ChatEngine
    from studio.train import checks

    items = evaluate.validation_items(run_dir, limit=val_rows or None)
    rows = [
        {"messages": [*it.messages, {"role": "assistant", "content": it.reference or ""}]}
        for it in items
    ]
    engine = ChatEngine()
    engine.load(run_dir)
    try:
        picked, limit = checks.pick_samples(engine.tokenizer, rows, n=len(rows))
        samples: list[dict[str, Any]] = []
        for i in range(0, len(picked), 8):  # batches of 8 keep padding and memory modest
            samples += checks.sample_answers(
                engine.model, engine.tokenizer, picked[i : i + 8], limit
            )
    finally:
        engine.unload()
    fmt = checks.answer_format([s["reference"] for s in samples])
    out: dict[str, Any] = {"val_rows": len(samples), "max_new_tokens": limit}
    out["format"] = fmt["label"] if fmt else None
    if fmt:
        out["base_format_rate"], out["tuned_format_rate"] = checks.format_rates(samples, fmt)
    for side in ("base", "tuned"):
        n = max(1, len(samples))
        out[f"{side}_rouge_l"] = round(
            sum(evaluate.rouge_l(s[side], s["reference"]) for s in samples) / n, 4
        )
        out[f"{side}_json_complete"] = round(
            sum(bool(evaluate.json_format_ok(s[side], s["reference"])) for s in samples) / n, 4
        )
    out["example"] = next(({k: s[k] for k in ("prompt", "base", "tuned")} for s in samples), None)
    return out


def bench_firstrun(args: argparse.Namespace) -> int:
    """The default click-through, headless: sample (redacted), CPU preset, Start, no edits."""
    from studio import paths
    from studio.train import checks
    from studio.train.jobs import execute_run
    from studio.train.prepare import prepare_run

    if args.data_dir:
        paths.set_data_dir(args.data_dir)
    dataset, what = _firstrun_dataset(args.allow_pii)
    cfg, line = _firstrun_config(dataset, args.allow_pii, args.max_steps)
    print(f"firstrun: {what}; {line}; load {_load()}", flush=True)
    t0 = time.perf_counter()
    result = execute_run(prepare_run(cfg))
    minutes = (time.perf_counter() - t0) / 60
    if result.status != "completed":
        print(f"the run ended {result.status}: {result.message}", file=sys.stderr)
        return 1
    meta = json.loads((result.run_dir / "training_metadata.json").read_text(encoding="utf-8"))
    timings = meta.get("timings") or {}
    print(
        f"minutes to finish: {minutes:.2f} (train {timings.get('train_s', 0) / 60:.2f},"
        f" answer checks {timings.get('answer_checks_s', 0):.0f} s);"
        f" {result.final_metrics.get('step')} steps (goal <= 5 min)"
    )
    print("did it learn?")
    for c in result.checks:
        print(f"  [{checks.verdict_of(c)}] {c['name']}: {c['detail']}")
        if c.get("fix") and checks.verdict_of(c) in ("amber", "red"):
            print(f"      -> {c['fix']}")
    scores = _firstrun_scores(result.run_dir, args.val_rows)
    _print_firstrun_scores(scores)
    results = {
        "machine": _machine(),
        "load_average_at_start": _load(),
        "run_dir": str(result.run_dir),
        "plan": line,
        "settings": cfg.to_dict(),
        "minutes": round(minutes, 2),
        "timings": timings,
        "final_metrics": result.final_metrics,
        "checks": {c["name"]: checks.verdict_of(c) for c in result.checks},
        "validation": scores,
    }
    _write_results(args, "firstrun", results)
    return 0


def _print_firstrun_scores(s: dict[str, Any]) -> None:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0%}"

    print(
        f"validation split ({s['val_rows']} rows, greedy, up to {s['max_new_tokens']} tokens):"
        f" format ({s['format'] or 'none shared'}) base {pct(s.get('base_format_rate'))}"
        f" vs fine-tune {pct(s.get('tuned_format_rate'))} (goal: fine-tune >= 80%,"
        f" base <= 20%); complete JSON base {pct(s['base_json_complete'])} vs fine-tune"
        f" {pct(s['tuned_json_complete'])}; ROUGE-L base {s['base_rouge_l']:.3f} vs"
        f" fine-tune {s['tuned_rouge_l']:.3f}"
    )


def _firstrun_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-steps", type=int, default=0, help="cap the steps (0: the default plan)")
    p.add_argument("--val-rows", type=int, default=0, help="validation rows to score (0: all)")
    p.add_argument("--allow-pii", action="store_true", help="train the sample unredacted")
    p.add_argument("--data-dir", help="the studio data dir (default: the usual one)")
    p.add_argument("--json", help="also write the results to this JSON file")


# name -> (help, argument setup, function)
COMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
] = {
    "data": ("dataset load/validate/PII-scan and token-length speed", _data_args, bench_data),
    "train": ("tutorial recipe vs the studio's training path", _train_args, bench_train),
    "app": ("app start-up and Start -> first training step", _app_args, bench_app),
    "uipath": (
        "a run through the Train tab's job vs the studio recipe",
        _uipath_args,
        bench_uipath,
    ),
    "chat": ("chat memory (both sides vs base alone) and speed", _chat_args, bench_chat),
    "firstrun": (
        "the default first run on the sample: time, did-it-learn, base vs fine-tune",
        _firstrun_args,
        bench_firstrun,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m studio.bench", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, setup, _) in COMMANDS.items():
        setup(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
