"""The ground every tab stands on: data dir, model resolution, a fast-starting app."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from studio import paths
from studio.models import loader as models

ROOT = Path(__file__).resolve().parents[1]


def test_data_dir_follows_flag_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = paths.data_dir()
    try:
        monkeypatch.setenv(paths.ENV_VAR, str(tmp_path / "from-env"))
        paths.set_data_dir(None)
        assert paths.data_dir() == (tmp_path / "from-env").resolve()
        paths.set_data_dir(tmp_path / "from-flag")
        assert paths.runs_dir() == (tmp_path / "from-flag" / "runs").resolve()
        assert paths.models_dir().is_dir() and paths.datasets_dir().is_dir()
    finally:
        paths.set_data_dir(before)


def test_unknown_model_lists_every_route_tried(studio_home: Path, tmp_path: Path) -> None:
    with pytest.raises(models.ModelNotFoundError) as err:
        models.resolve_model(str(tmp_path / "no-such-model"))
    assert "no-such-model" in str(err.value) and "does not exist" in str(err.value)
    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    with pytest.raises(models.ModelNotFoundError, match=r"no config\.json"):
        models.resolve_model(str(not_a_model))
    with pytest.raises(models.ModelNotFoundError) as err:
        models.resolve_model("nobody-here/not-a-real-model-xyz", allow_hub=False)
    text = str(err.value)
    assert "hub id nobody-here/not-a-real-model-xyz" in text
    assert "embedded copy: only for the default model" in text


@pytest.mark.slow
def test_embedded_model_resolves_and_answers(embedded_model: models.ResolvedModel) -> None:
    """The real SmolLM2 from the PyPI wheel, converted once, answers a simple question."""
    assert embedded_model.source in {"embedded", "hub"}
    assert (embedded_model.path / "config.json").is_file()
    assert models.resolve_model(models.DEFAULT_MODEL).path == embedded_model.path  # reused
    model = models.load_model_for_inference(embedded_model.path, device="cpu")
    tok = models.load_tokenizer(embedded_model.path)
    answer = models.greedy_answer(model, tok, "What is the capital of France?")
    assert "Paris" in answer


def test_ui_build_imports_no_torch() -> None:
    """Building the UI must not import torch & co.: the window has to come up fast."""
    code = (
        "import sys\n"
        "from studio.ui.app import build_app\n"
        "demo = build_app()\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'bitsandbytes')"
        " if m in sys.modules]\n"
        "assert 'torch' not in sys.modules, heavy\n"
        "assert not heavy, heavy\n"
        "import gradio as gr\n"
        "print('TABS', [b.label for b in demo.blocks.values() if isinstance(b, gr.Tab)])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    tabs = done.stdout.split("TABS", 1)[1]
    for name in ("Dataset", "Hardware", "Train", "Chat"):
        assert f"'{name}'" in tabs, tabs


def test_a_handlers_first_heavy_import_waits_for_the_one_import_thread() -> None:
    """With the app's import guard on, a thread's plain `from transformers import ...` waits
    while another thread runs `heavy.ready()` (held here by its lock), then goes through it:
    no two threads import the heavy packages at once (the half-initialised-module race)."""
    code = (
        "import builtins, sys, threading, time\n"
        "from studio import heavy\n"
        "plain = builtins.__import__\n"
        "heavy.guard_imports()\n"
        "assert builtins.__import__ is not plain\n"
        "heavy._lock.acquire()  # another thread is in ready()\n"
        "def handler():\n"
        "    from transformers import AutoTokenizer  # noqa\n"
        "t = threading.Thread(target=handler); t.start(); time.sleep(1.5)\n"
        "assert t.is_alive() and 'transformers' not in sys.modules, 'imported beside ready()'\n"
        "heavy._lock.release(); t.join(120)\n"
        "assert not t.is_alive() and heavy._done and 'peft' in sys.modules\n"
        "assert builtins.__import__ is plain  # the guard is gone once ready() has run\n"
        "print('OK')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


def test_engine_never_imports_gradio() -> None:
    offenders = []
    for path in (ROOT / "studio").rglob("*.py"):
        if "ui" in path.relative_to(ROOT / "studio").parts:
            continue
        text = path.read_text(encoding="utf-8")
        if "import gradio" in text or "from gradio" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_every_plot_is_built_in_plots_py() -> None:
    """One home for figures: plotly is imported only by studio/plots.py."""
    offenders = []
    for path in (ROOT / "studio").rglob("*.py"):
        if path == ROOT / "studio" / "plots.py":
            continue
        text = path.read_text(encoding="utf-8")
        if "import plotly" in text or "from plotly" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


@pytest.mark.slow
@pytest.mark.browser
def test_app_serves_four_tabs_in_chromium(start_app, page) -> None:
    from playwright.sync_api import expect

    app = start_app()
    assert "127.0.0.1" in app.log()
    page.goto(app.url)
    for name in ("Dataset", "Hardware", "Train", "Chat"):
        page.get_by_role("tab", name=name, exact=True).wait_for(timeout=30_000)
    page.get_by_role("tab", name="Chat", exact=True).click()
    expect(page.locator("#chat-status")).to_contain_text("Nothing loaded yet")
    page.get_by_role("tab", name="Dataset", exact=True).click()
    expect(page.locator("#dataset-status")).to_contain_text("No dataset loaded")
    assert page.title() == "LoRA Studio"
    # SIGTERM closes the app as Ctrl-C does: a normal exit, so exit hooks run (Python's
    # default would end it with -15 and skip them; studio.train.jobs.end_children)
    app.kill(signal.SIGTERM)
    assert app.proc.returncode == 0, app.log()
