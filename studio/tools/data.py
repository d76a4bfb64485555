"""`python -m studio.bench data`: dataset load/validate/normalize/PII-scan and token-length speed.

A generated JSONL of mixed English/Vietnamese/Thai support conversations (~600 bytes a row)
in a temp dir, loaded, validated, normalized and PII-scanned (target: >= 5,000 rows/s, peak
memory < 2 GB), then token-length statistics of the same rows with the default model's
tokenizer (target: < 30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from studio.tools.common import PeakRSS, cpu_seconds, load_average, machine, mb, write_results

HELP = "dataset load/validate/PII-scan and token-length speed"

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


def run(args: argparse.Namespace) -> int:
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
            f" {time.perf_counter() - t0:.1f} s: {path} (load average {load_average()})",
            flush=True,
        )

        with PeakRSS() as mem:
            c0 = cpu_seconds()
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
        cpu = cpu_seconds() - c0
        results: dict[str, Any] = {
            "machine": machine(),
            "rows": report.total,
            "mb": round(size / 1e6, 1),
            "load_average_at_start": load_average(),
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
            f"peak memory: {mb(mem.peak_bytes)} RSS (at start {mb(mem.start_bytes)};"
            f" target < 2,048 MB)",
            flush=True,
        )

        if not args.no_tokens:
            results.update(_bench_token_stats(report.rows, args.max_len))
        if args.keep:
            print(f"kept {path}")
        write_results(args, "data", results)
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
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    stats = token_stats(rows, tok, max_len)
    t_tok = time.perf_counter() - t0
    print(
        f"token lengths: {stats['rows']:,} rows in {t_tok:.2f} s (target < 30 s;"
        f" CPU {cpu_seconds() - c0:.2f} s on {os.cpu_count()} cores, load {load_average()});"
        f" p50 {stats['p50']}, p95 {stats['p95']}, max {stats['max']},"
        f" {stats['over_max_len']:,} rows over {max_len} tokens"
    )
    return {
        "token_stats_s": round(t_tok, 2),
        "token_p50": stats["p50"],
        "token_p95": stats["p95"],
        "token_max": stats["max"],
    }


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=100_000, help="rows to generate (100000)")
    p.add_argument("--max-len", type=int, default=512, help="max sequence length (512)")
    p.add_argument("--no-tokens", action="store_true", help="skip the token-length part")
    p.add_argument("--keep", action="store_true", help="keep the generated file")
    p.add_argument("--json", help="also write the results to this JSON file")
