"""Benchmarks that print measured figures for the studio's speed and memory targets.

Run `python -m studio.bench <command>`; commands:
  data [--rows 100000] [--max-len 512] [--no-tokens] [--keep]
      Write a generated JSONL of mixed English/Vietnamese/Thai support conversations (~600
      bytes a row) to a temp dir, then load + validate + normalize + PII-scan it (target:
      >= 5,000 rows/s, peak memory < 2 GB) and compute token-length statistics for the same
      rows with the default model's tokenizer (target: < 30 s).

Each command is a function `bench_<name>(args)` registered in COMMANDS with its own
argument setup, so new benchmarks (train, app) slot in beside `data`.
"""

from __future__ import annotations

import argparse
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
    from studio import data

    try:
        from studio import pii
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
            from studio import models

            resolved = models.resolve_model(models.DEFAULT_MODEL)
            tok = models.load_tokenizer(resolved.path)
            c0 = _cpu()
            t0 = time.perf_counter()
            stats = data.token_stats(report.rows, tok, args.max_len)
            t_tok = time.perf_counter() - t0
            print(
                f"token lengths: {stats['rows']:,} rows in {t_tok:.2f} s (target < 30 s;"
                f" CPU {_cpu() - c0:.2f} s on {os.cpu_count()} cores, load {_load()});"
                f" p50 {stats['p50']}, p95 {stats['p95']}, max {stats['max']},"
                f" {stats['over_max_len']:,} rows over {args.max_len} tokens"
            )
        if args.keep:
            print(f"kept {path}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=100_000, help="rows to generate (100000)")
    p.add_argument("--max-len", type=int, default=512, help="max sequence length (512)")
    p.add_argument("--no-tokens", action="store_true", help="skip the token-length part")
    p.add_argument("--keep", action="store_true", help="keep the generated file")


# name -> (help, argument setup, function)
COMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
] = {
    "data": ("dataset load/validate/PII-scan and token-length speed", _data_args, bench_data),
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
