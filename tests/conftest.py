"""Shared fixtures: one studio data dir per test session, the real embedded model, Chromium.

The converted embedded model is cached in a fixed temp folder across sessions (converting
takes ~30 s); everything else a test writes goes under the session's own data dir.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(tempfile.gettempdir()) / "lora-studio-test-models"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
# The studio's own code, whose every open() must name its encoding (Windows' default is cp1252).
OWN_SOURCES = (str(ROOT / "studio"), str(ROOT / "app.py"))
# Processes the tests start (the CLIs, the app) report a missing encoding too (PEP 597).
os.environ["PYTHONWARNDEFAULTENCODING"] = "1"
# Two xdist workers share the cores: one torch thread each (and in the processes they
# start), not two each fighting over two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


# The longest files first (CI's log: `--durations`): two workers each take the next file as
# they free up, so the long ones start early and the short ones fill the end; a long file
# collected last would run alone at the end, on one worker's single thread.
LONGEST_FILES = (
    "test_journey.py",
    "test_bench.py",
    "test_chat.py",
    "test_distributed.py",
    "test_export.py",
    "test_dpo_ui.py",
    "test_architectures.py",
    "test_train.py",
    "test_train_ui.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: each file keeps its own order


def pytest_report_header() -> str:
    on = "on" if sys.flags.warn_default_encoding else "off (run python -X warn_default_encoding)"
    return f"encoding guard: {on}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Fail a test whose run reached an open()/read_text()/subprocess(text=True) in the
    studio's own files without an encoding: on Windows that reads and writes cp1252 and
    breaks Vietnamese. Needs `python -X warn_default_encoding` (README's test command);
    torch warns at import too, so a global `-W error::EncodingWarning` cannot be used."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", EncodingWarning)
        result = yield
    ours = []
    for w in seen:
        if issubclass(w.category, EncodingWarning) and w.filename.startswith(OWN_SOURCES):
            ours.append(f"{w.filename}:{w.lineno}")
        else:  # hand every other warning back to pytest's own report
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if ours:
        pytest.fail("no encoding given (Windows would use cp1252) at: " + ", ".join(ours))
    return result


@pytest.fixture(scope="session")
def studio_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh data dir whose models/ points at the shared converted-model cache."""
    from studio import paths

    home = tmp_path_factory.mktemp("studio-home")
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(MODEL_CACHE, target_is_directory=True)
    paths.set_data_dir(home)
    return home


@pytest.fixture(autouse=True)
def data_dir_back_to_the_sessions(studio_home: Path) -> Iterator[None]:
    """Each test ends in the session's data dir. A test that pins another in-process (e.g.
    `doctor.main(["--data-dir", tmp])`) would otherwise leave it to the next tests, and the
    next to need the model converted it again there (~30 s, in the quick subset)."""
    from studio import paths

    yield
    paths.set_data_dir(studio_home)


@pytest.fixture(scope="session")
def embedded_model(studio_home: Path):
    """The real SmolLM2-135M-Instruct, resolved the way the app does it (no mocks)."""
    from studio.models import loader as models

    return models.resolve_model(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tokenizer(embedded_model):
    from studio.models.loader import load_tokenizer

    return load_tokenizer(embedded_model.path)


@pytest.fixture(scope="session")
def sample_dataset_path() -> Path:
    return ROOT / "studio" / "data" / "sample_data" / "support_tickets.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """`python app.py` on a free port, with its log kept for failure reports."""

    def __init__(self, home: Path, extra: list[str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / f"app-{self.port}.log"
        self._log = self.log_path.open("w", encoding="utf-8")
        cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(self.port)]
        cmd += ["--data-dir", str(home), *(extra or [])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )

    def wait_ready(self, timeout: float = 90) -> None:
        import urllib.request

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"app not serving after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self, sig: int | None = None) -> None:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture()
def start_app(studio_home: Path) -> Iterator:
    """Factory: start `python app.py` (optionally with its own data dir); stopped after the test."""
    started: list[AppProcess] = []

    def start(home: Path | None = None, extra: list[str] | None = None) -> AppProcess:
        app = AppProcess(home or studio_home, extra)
        started.append(app)
        app.wait_ready()
        return app

    yield start
    for app in started:
        app.kill()


@pytest.fixture(scope="session")
def browser() -> Iterator:
    """Debian's Chromium driven by Playwright (its own browser download does not work here)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's 'chromium' package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        yield b
        b.close()


@pytest.fixture()
def page(browser, request: pytest.FixtureRequest) -> Iterator:
    """A new page; on failure its screenshot lands in test-artifacts/."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    yield pg
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the item so fixtures can save artifacts on failure."""
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def copy_sample(dest_dir: Path, sample: Path) -> Path:
    """A copy of the sample dataset that a test may touch without risk to the original."""
    dest = dest_dir / sample.name
    shutil.copyfile(sample, dest)
    return dest
