"""Train tab tests: the helpers behind the handlers, and a real run started from Chromium."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import expect

from studio import runs
from studio.config import ConfigError, RunConfig
from studio.train.jobs import JobSnapshot
from tests.conftest import MODEL_CACHE
from tests.ui_steps import fill, set_train_settings

STARTED = re.compile(r"▶️ Started ui-run")  # the notice of a run that started
BUSY = re.compile(r"Not started\. A run is (already training: ui-run|being prepared)")


def test_config_from_ui_takes_other_tabs_values_and_names_bad_fields():
    from studio.ui.train_tab import FIELDS, config_from_ui

    values = {name: getattr(RunConfig(), name) for name in FIELDS}
    extras = {
        "model.name": "/models/my-model",
        "dataset.path": "/data/clean.jsonl",
        "dataset.format": "sharegpt",
        "hardware.preset": "RTX 3060 12 GB",
    }
    cfg = config_from_ui({**values, "batch_size": 2.0, "learning_rate": 1e-4}, extras)
    assert (cfg.base_model, cfg.dataset_path, cfg.dataset_format) == (
        "/models/my-model",
        "/data/clean.jsonl",
        "sharegpt",
    )
    assert (cfg.preset, cfg.batch_size, cfg.learning_rate) == ("RTX 3060 12 GB", 2, 1e-4)
    assert config_from_ui(values, {}).base_model == RunConfig().base_model  # no Hardware tab
    with pytest.raises(ConfigError) as info:
        config_from_ui({**values, "lora_r": None}, {})
    assert info.value.field == "lora_r"


def test_progress_and_result_text_show_the_figures_and_advice():
    from studio.ui.train_tab import progress_markdown, result_markdown

    snap = JobSnapshot(
        state="running",
        run_name="demo-1",
        method="lora",
        step=5,
        total_steps=20,
        epoch=0.25,
        train_loss=1.5,
        eval_loss=1.7,
        learning_rate=2e-4,
        tokens_per_s=321.0,
        elapsed_s=65,
        eta_s=195,
        peak_memory_mb=2048,
        memory_kind="process RSS",
        power_w=170,
        energy_kwh=0.003,
        energy_cost=0.0009,
    )
    text = progress_markdown(snap)
    for part in ("5/20", "25%", "1.5000", "1.7000", "321", "1m05s", "3m15s", "2.00 GiB", "170 W"):
        assert part in text, part
    failed = JobSnapshot(
        state="failed",
        message="Out of GPU memory during training.",
        advice=["Halve the batch (4 -> 2) and double gradient accumulation (1 -> 2)."],
        retry_config={"batch_size": 2},
    )
    assert "Halve the batch" in result_markdown(failed)


@pytest.mark.slow
@pytest.mark.browser
def test_a_run_started_from_the_train_tab_updates_the_chart_and_finishes(start_app, page, browser):
    app = start_app()
    page.goto(app.url)
    page.get_by_role("tab", name="Train").click()

    wanted = {
        "train-run-name": ("ui-run", "run_name: ui-run"),
        "train-max-steps": ("4", "max_steps: 4"),
        "train-batch-size": ("2", "batch_size: 2"),
        "train-grad-accum": ("1", "grad_accum: 1"),
        "train-max-seq-len": ("160", "max_seq_len: 160"),
        "train-learning-rate": ("0.001", "learning_rate: 0.001"),
        "train-val-fraction": ("0.02", "val_fraction: 0.02"),
        "train-save-steps": ("2", "save_steps: 2"),
    }
    set_train_settings(page, wanted)

    before = {r.name for r in runs.list_runs()}
    notice = page.locator("#train-notice")
    # The bundled sample carries planted PII: the first Start is refused, and no run starts.
    page.locator("#train-start").click()
    expect(notice).to_contain_text("unresolved", timeout=30_000)
    expect(notice).to_contain_text("Not started")
    page.wait_for_timeout(2000)  # a run wrongly started would be listed by now
    assert {r.name for r in runs.list_runs()} == before
    # Confirming starts it ("Started" alone would also match "Not started").
    page.locator("#train-allow-pii input").check()
    page.locator("#train-start").click()
    expect(notice).to_contain_text(STARTED, timeout=30_000)
    (run_name,) = {r.name for r in runs.list_runs()} - before

    # A second browser tab, opened while the run loads its model, shows that run, and its
    # Start is refused as busy (checked before the PII question, which it would also get).
    other = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    other.goto(app.url)
    other.get_by_role("tab", name="Train").click()
    expect(other.locator("#train-progress")).to_contain_text(run_name, timeout=30_000)
    other.locator("#train-start").click()
    expect(other.locator("#train-notice")).to_contain_text(BUSY, timeout=30_000)
    now = {r.name: r.status for r in runs.list_runs()}
    assert set(now) - before == {run_name} and now[run_name] == "running"  # no second run
    other.context.close()

    progress = page.locator("#train-progress")
    chart_traces = page.locator("#train-chart .scatterlayer .trace")
    deadline = time.time() + 400
    while time.time() < deadline and chart_traces.count() == 0:
        page.wait_for_timeout(1000)
    assert chart_traces.count() > 0, progress.inner_text()

    progress.get_by_text("Completed").wait_for(timeout=400_000)
    run_dir = page.locator("#train-run-dir textarea").input_value()
    assert run_dir and runs.open_run(run_dir).status == "completed"
    assert (runs.open_run(run_dir).path / "adapter" / "adapter_model.safetensors").is_file()
    expect(page.locator("#train-result")).to_contain_text("Did it learn?")
    steps = [e["step"] for e in runs.load_log(run_dir) if e.get("kind") == "train"]
    assert steps == [1, 2, 3, 4]
    assert chart_traces.count() >= 1
    table = page.locator("#train-runs")
    expect(table).to_contain_text(runs.open_run(run_dir).name, timeout=30_000)
    expect(table).to_contain_text("completed")


# Typed while the page-load events (hardware detection and its preset fill, the plan) are
# still on their way: values that differ from the CPU preset's band (batch 2, accumulation 2,
# length 512, lr 1e-3), so a late fill that overwrote them would show.
TYPED = {
    "train-max-seq-len": ("160", "max_seq_len: 160"),
    "train-grad-accum": ("1", "grad_accum: 1"),
    "train-batch-size": ("3", "batch_size: 3"),
    "train-learning-rate": ("0.002", "learning_rate: 0.002"),
}


class _HeldEvents:
    """Holds every event the page sends to the server until released: the page-load events
    leave with the values of the untouched page and are answered after the typing, as they
    are when detection is slow (the first torch import on a busy PC)."""

    def __init__(self, page) -> None:
        self.routes: list = []
        self.released = False
        page.route("**/gradio_api/queue/join*", self._on_request)

    def _on_request(self, route) -> None:
        if self.released:
            route.continue_()
        else:
            self.routes.append(route)

    def release(self) -> None:
        """Send the held events, in the order the page sent them."""
        self.released = True
        while self.routes:
            self.routes.pop(0).continue_()


@pytest.mark.slow
@pytest.mark.browser
def test_values_typed_before_the_page_load_fill_are_kept_and_used(start_app, page, tmp_path):
    from tests.test_hardware_ui import pick, wait_verdict

    (tmp_path / "models").symlink_to(MODEL_CACHE, target_is_directory=True)
    app = start_app(home=tmp_path)  # its own data dir: the run started here stays out of others
    held = _HeldEvents(page)
    page.goto(app.url)
    page.get_by_role("tab", name="Train").click()
    page.wait_for_function("() => !!document.querySelector('#train-max-seq-len input')")
    for elem_id, (value, _line) in TYPED.items():
        fill(page, elem_id, value)
    assert held.routes, "the page sent no events on load"  # none answered: all are held
    held.release()

    # Settled: detection done and its estimate shown, then the plan made on the Train tab.
    page.get_by_role("tab", name="Hardware", exact=True).click()
    expect(page.locator("#hw-detected")).to_contain_text("Preset:", timeout=60_000)
    wait_verdict(page, r"^. ?(Fits|Tight|Won't fit):")
    page.get_by_role("tab", name="Train").click()
    plan = page.locator("#train-plan")
    expect(plan).to_contain_text("Pre-flight", timeout=60_000)
    page.wait_for_timeout(1000)  # a late fill, if any, lands meanwhile
    for elem_id, (value, _line) in TYPED.items():
        box = page.locator(f"#{elem_id} input")
        assert float(box.input_value()) == float(value), (elem_id, box.input_value())
    expect(plan).to_contain_text("at max length 160")  # the plan and pre-flight used them
    expect(plan).to_contain_text("learning_rate kept")
    note = page.locator("#train-fill-note")  # the fill came, and says what it left alone
    expect(note).to_contain_text("filled from the detected preset")
    expect(note).to_contain_text(re.compile(r"Your own .*max_seq_len.* kept"))

    # Start uses them: the run folder's run.yaml (the config it trains) has the typed values.
    page.locator("#train-allow-pii input").check()  # the sample's planted PII
    page.locator("#train-start").click()
    notice = page.locator("#train-notice")
    expect(notice).to_contain_text(re.compile(r"▶️ Started \S+\."), timeout=30_000)
    name = re.search(r"Started (\S+)\.", notice.inner_text()).group(1).strip("*")
    page.locator("#train-stop").click()  # then the notice says Stop's news, not the name
    run_yaml = (tmp_path / "runs" / name / runs.RUN_YAML).read_text(encoding="utf-8")
    for _value, line in TYPED.values():
        assert line in run_yaml, (line, run_yaml)

    # A preset the user picks fills again, typed fields included, and says what it replaced.
    page.get_by_role("tab", name="Hardware", exact=True).click()
    pick(page, "hw-preset", "NVIDIA RTX 4060 8 GB")
    page.get_by_role("tab", name="Train").click()
    expect(note).to_contain_text("the preset you picked", timeout=30_000)
    expect(note).to_contain_text(re.compile(r"Replaced what you had typed: .*max_seq_len 160 →"))
    assert page.locator("#train-max-seq-len input").input_value() != "160"
