"""`python -m studio.bench app`: seconds from `python app.py` to the page served, and from a
click on Start (Chromium) to the first training step shown."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from studio.tools.common import machine, write_results

HELP = "app start-up and Start -> first training step"


def run(args: argparse.Namespace) -> int:
    """Seconds from `python app.py` to the page being served, and from Start to step 1.

    The second figure clicks Start in Chromium (Playwright + /usr/bin/chromium) and waits
    for step 1 of a 2-step run; without them it says it skipped.
    """
    import socket
    import subprocess
    import urllib.request

    root = Path(__file__).resolve().parents[2]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(root / "app.py"), "--port", str(port)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    results: dict[str, Any] = {"machine": machine()}
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
    write_results(args, "app", results)
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


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="the studio data dir to start the app with")
    p.add_argument("--no-train", action="store_true", help="only time the page start-up")
    p.add_argument("--json", help="also write the results to this JSON file")
