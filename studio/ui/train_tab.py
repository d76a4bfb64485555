"""Train tab: the run settings, Start / Stop / Resume, a live loss chart, progress and log.

A thin layer over `studio.train.jobs` (the process-wide background job) and `studio.runs` (run
folders): a gr.Timer polls the job once a second, so a reloaded page or a second browser tab
shows the same run, and a closed page does not stop it. The settings are RunConfig fields,
registered in ctx as "train.<field>" for the Hardware tab to fill.

A value the user typed wins over every fill the user did not ask for: each field's `.input`
marks it in "train.edited", which the page-load preset fill (Hardware tab) and the recipe
plan read when they answer, not when they were sent. A fill the user asks for (picking a
preset or model, Auto-fit, Retry) may replace typed values, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from studio import runs
from studio.config import (
    DEFAULT_MODEL,
    DEVICES,
    METHODS,
    OBJECTIVES,
    OPTIMIZERS,
    SWITCHES,
    TARGETS,
    ConfigError,
    RunConfig,
)
from studio.hardware import fallback
from studio.train import checks, distributed
from studio.train.jobs import JobBusyError, JobSnapshot, get_manager
from studio.train.plan import PLAN_FIELDS, RunPlan, plan_run

# (field, label, kind, extra kwargs); kind: text, int, float, bool, or a tuple of choices.
BASIC_FIELDS: list[tuple[str, str, Any, dict[str, Any]]] = [
    (
        "objective",
        "Objective",
        OBJECTIVES,
        {"info": "SFT: imitate the answers · DPO: prefer chosen over rejected (preference data)"},
    ),
    ("dpo_beta", "DPO beta", "float", {"info": "Higher stays closer to the start (0.1 usual)"}),
    (
        "init_adapter",
        "Continue from run (folder)",
        "text",
        {"info": "A finished run's folder: its adapter trains on (SFT then DPO). Empty: fresh"},
    ),
    ("run_name", "Run name", "text", {}),
    ("method", "Method", METHODS, {"info": "QLoRA: 4-bit NF4 base, about 1/4 of the memory"}),
    ("target_modules", "LoRA targets", TARGETS, {}),
    ("lora_r", "LoRA rank r", "int", {}),
    ("lora_alpha", "LoRA alpha", "int", {}),
    ("lora_dropout", "LoRA dropout", "float", {}),
    ("max_seq_len", "Max length (tokens)", "int", {}),
    ("batch_size", "Batch size", "int", {}),
    ("grad_accum", "Gradient accumulation", "int", {}),
    ("learning_rate", "Learning rate", "float", {}),
    ("epochs", "Epochs", "float", {}),
    ("max_steps", "Max steps (0 = use epochs)", "int", {}),
    ("optimizer", "Optimizer", OPTIMIZERS, {}),
    ("gradient_checkpointing", "Gradient checkpointing", "bool", {}),
]
ADVANCED_FIELDS: list[tuple[str, str, Any, dict[str, Any]]] = [
    (
        "dpo_sft_weight",
        "DPO: SFT loss weight on chosen",
        "float",
        {"info": "0: plain DPO; 1: also learn to write the chosen answers (RPO)"},
    ),
    ("save_steps", "Checkpoint every N steps (0 = about 4 per run)", "int", {}),
    ("eval_steps", "Evaluate every N steps (0 = about 5 per run)", "int", {}),
    ("val_fraction", "Validation share", "float", {}),
    ("warmup_ratio", "Warmup ratio", "float", {}),
    ("lr_scheduler", "LR schedule", ("cosine", "linear", "constant_with_warmup"), {}),
    ("max_grad_norm", "Gradient clipping (max norm)", "float", {}),
    ("weight_decay", "Weight decay", "float", {}),
    ("logging_steps", "Log every N steps", "int", {}),
    ("seed", "Seed", "int", {}),
    ("device", "Device", DEVICES, {}),
    ("price_per_kwh", "Electricity price per kWh", "float", {}),
    ("assistant_only_loss", "Loss on assistant replies only", "bool", {}),
    ("packing", "Pack rows into full-length blocks", "bool", {}),
    (
        "activation_offloading",
        "Activation offloading (long context)",
        SWITCHES,
        {"info": "auto: on when the fit check says tight or won't fit (GPU only; uses RAM)"},
    ),
    (
        "liger_kernels",
        "Liger kernels (long context)",
        SWITCHES,
        {"info": "auto: on when the fit check says tight or won't fit (GPU with Triton)"},
    ),
    (
        "tiled_mlp",
        "Tiled MLP (long context)",
        SWITCHES,
        {"info": "auto: on when the other two are not enough (any GPU; about 20% slower)"},
    ),
    (
        "wandb",
        "Also log to Weights & Biases",
        "bool",
        {
            "info": "Needs `pip install wandb` and `wandb login` (or WANDB_API_KEY); otherwise"
            " skipped. TensorBoard files are always written to the run folder."
        },
    ),
    (
        "trust_remote_code",
        "Trust remote code (runs Python from the model repo!)",
        "bool",
        {"info": "Only for models you trust; off by default."},
    ),
]
FIELDS = [f[0] for f in BASIC_FIELDS + ADVANCED_FIELDS] + ["allow_pii"]
CROSS_TAB = (
    "model.name",
    "dataset.path",
    "dataset.format",
    "dataset.pii_count",
    "hardware.preset",
    "hardware.gpu",
)
# Settings that change the plan or the pre-flight (besides the other tabs' model, data, preset).
PLAN_INPUTS = (
    "batch_size", "grad_accum", "max_seq_len", "val_fraction", "seed", "max_steps", "objective",
)  # fmt: skip
RUN_HEADERS = [
    "run",
    "status",
    "method",
    "base model",
    "steps",
    "train loss",
    "eval loss",
    "created",
]
RESUMABLE = ("interrupted", "stopped", "failed")


def _component(field: str, label: str, kind: Any, extra: dict[str, Any], default: Any):
    elem_id = f"train-{field.replace('_', '-')}"
    if isinstance(kind, tuple):
        return gr.Dropdown(list(kind), value=default, label=label, elem_id=elem_id, **extra)
    if kind == "bool":
        return gr.Checkbox(value=default, label=label, elem_id=elem_id, **extra)
    if kind == "int":
        return gr.Number(value=default, label=label, precision=0, elem_id=elem_id, **extra)
    if kind == "float":
        return gr.Number(value=default, label=label, elem_id=elem_id, **extra)
    return gr.Textbox(value=default, label=label, elem_id=elem_id, **extra)


def build_train_tab(ctx: dict[str, Any]) -> dict[str, Any]:
    """Create the tab's components inside the open gr.Tab; returns them by name.

    Registers every setting as "train.<field>" (the Hardware and Dataset tabs read them) and
    the "runs.refresh" signal (Chat and Export refresh their run lists when it changes).
    """
    ui: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            _build_settings(ui)
        with gr.Column(scale=1):
            _build_run_panel(ui)
    _build_past_runs(ui)
    ui["seen"] = gr.State(-1)  # the job version this browser tab last drew
    ui["drawn"] = gr.State("")  # the curve this browser tab last drew (run, points)
    # The fields the user typed into; automatic fills leave them alone. A list mutated in
    # place: a slow handler holding it sees the marks made while it ran.
    ui["edited"] = gr.State([])
    ui["timer"] = gr.Timer(1.0)
    for name in FIELDS:
        ctx[f"train.{name}"] = ui[name]
    ctx["train.edited"] = ui["edited"]
    ctx["train.model"] = ui["model"]
    ctx["train.fill_note"] = ui["fill_note"]
    ctx["runs.refresh"] = gr.State(0)
    return ui


def _build_settings(ui: dict[str, Any]) -> None:
    """The RunConfig fields (basic in rows of three, advanced folded), PII consent, YAML."""
    defaults = RunConfig()

    def add(fields: list[tuple[str, str, Any, dict[str, Any]]]) -> None:
        for name, label, kind, extra in fields:
            ui[name] = _component(name, label, kind, extra, getattr(defaults, name))

    gr.Markdown("### Settings\nFilled by the Hardware tab's preset; edit freely.")
    ui["model"] = _model_picker()
    ui["fill_note"] = gr.Markdown(elem_id="train-fill-note")  # what the last preset fill did
    ui["target"] = gr.Markdown(elem_id="train-target")
    ui["plan"] = gr.Markdown(elem_id="train-plan")
    for start in range(0, len(BASIC_FIELDS), 3):
        with gr.Row():
            add(BASIC_FIELDS[start : start + 3])
    with gr.Accordion("Advanced settings", open=False):
        with gr.Row():
            add([f for f in ADVANCED_FIELDS if f[2] != "bool"])
        with gr.Column():
            add([f for f in ADVANCED_FIELDS if f[2] == "bool"])
    with gr.Group(visible=False) as ui["pii_group"]:
        ui["pii_md"] = gr.Markdown()
        ui["allow_pii"] = gr.Checkbox(
            value=False,
            label="Train anyway: I checked the findings and accept them",
            elem_id="train-allow-pii",
        )
    with gr.Accordion("Run config (YAML): the same run headless", open=False):
        gr.Markdown("Save it as `run.yaml` and run `python -m studio.train run.yaml`.")
        ui["yaml"] = gr.Code(language="yaml", interactive=False, elem_id="train-yaml")


def _model_picker() -> Any:
    """The run's base model: the Hardware tab's list (fit per method on the chosen card, download
    size), kept in step with that tab's picker; free text takes a hub id or a folder."""
    from studio.ui.hardware_tab import model_choices

    return gr.Dropdown(
        choices=model_choices(),
        value=DEFAULT_MODEL,
        label="Base model",
        info="Fit on the Hardware tab's card (LoRA, QLoRA) and download size; or type a hub id"
        " or a local folder.",
        allow_custom_value=True,
        elem_id="train-model",
        interactive=True,
    )


def _build_run_panel(ui: dict[str, Any]) -> None:
    """Start / Stop, progress, the live chart, the result, the run folder and the log."""
    with gr.Row():
        ui["start"] = gr.Button("Start training", variant="primary", elem_id="train-start")
        ui["stop"] = gr.Button("Stop", variant="stop", elem_id="train-stop")
    n = distributed.offered_processes()  # several GPUs: the same run through accelerate (DDP)
    ui["all_gpus"] = gr.Checkbox(
        label=distributed.offer_label(n), value=False, visible=n >= 2, elem_id="train-all-gpus"
    )
    ui["notice"] = gr.Markdown(elem_id="train-notice")
    ui["progress"] = gr.Markdown("No run yet.", elem_id="train-progress")
    ui["chart"] = gr.Plot(label="Loss", elem_id="train-chart")
    ui["result"] = gr.Markdown(elem_id="train-result")
    ui["retry"] = gr.Button(
        "Retry with the suggested settings", visible=False, elem_id="train-retry"
    )
    ui["run_dir"] = gr.Textbox(
        label="Run folder", interactive=False, elem_id="train-run-dir", buttons=["copy"]
    )
    ui["log"] = gr.Textbox(
        label="Log", lines=10, max_lines=10, interactive=False, elem_id="train-log"
    )


def _build_past_runs(ui: dict[str, Any]) -> None:
    """The past-runs table, Resume, and the overlay of several runs' curves."""
    with gr.Accordion("Past runs", open=True):
        with gr.Row():
            ui["refresh"] = gr.Button("Refresh", size="sm", elem_id="train-refresh")
            ui["resume_dd"] = gr.Dropdown(
                label="Run to resume (interrupted, stopped or failed)",
                choices=[],
                elem_id="train-resume-run",
                scale=3,
            )
            ui["resume"] = gr.Button("Resume", elem_id="train-resume")
        ui["runs_table"] = gr.Dataframe(
            headers=RUN_HEADERS, interactive=False, elem_id="train-runs", wrap=True
        )
        ui["overlay_dd"] = gr.Dropdown(
            label="Overlay the curves of runs",
            multiselect=True,
            choices=[],
            elem_id="train-overlay",
        )
        ui["compare"] = gr.Plot(label="Compare runs", elem_id="train-compare")


@dataclass
class TrainWiring:
    """The tab's components by name, and the other tabs' values a run config takes."""

    ui: dict[str, Any]
    cross: dict[str, Any]  # CROSS_TAB name -> component, where that tab exists
    refresh_signal: Any

    def inputs(self) -> set[Any]:
        return {*(self.ui[name] for name in FIELDS), *self.cross.values()}

    def plan_outputs(self) -> list[Any]:
        return [self.ui["plan"], *(self.ui[name] for name in PLAN_FIELDS)]

    def read(self, values: dict[Any, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(settings by field name, other tabs' values by ctx name)."""
        settings = {name: values.get(self.ui[name]) for name in FIELDS}
        extras = {key: values.get(comp) for key, comp in self.cross.items()}
        return settings, extras

    def past_outputs(self) -> list[Any]:
        return [self.ui["runs_table"], self.ui["resume_dd"], self.ui["overlay_dd"]]

    def poll_outputs(self) -> list[Any]:
        names = ("progress", "chart", "log", "run_dir", "result", "retry", "seen", "drawn")
        return [*(self.ui[k] for k in names), self.refresh_signal, *self.past_outputs()]


def wire_train_tab(ctx: dict[str, Any], ui: dict[str, Any]) -> None:
    """Attach the events; other tabs' model, dataset and preset are read when they exist."""
    w = TrainWiring(ui, {key: ctx[key] for key in CROSS_TAB if key in ctx}, ctx["runs.refresh"])
    inputs, past_outputs = w.inputs(), w.past_outputs()
    preview_out = [ui["yaml"], ui["target"]]
    for comp in inputs:
        if hasattr(comp, "change"):
            comp.change(partial(preview, w), inputs, preview_out, show_progress="hidden")
    demo = ctx.get("demo")
    if demo is not None:
        demo.load(partial(preview, w), inputs, preview_out)
        demo.load(past_runs_updates, None, past_outputs)
    if "dataset.pii_count" in ctx:
        ctx["dataset.pii_count"].change(
            pii_notice,
            ctx["dataset.pii_count"],
            [ui["pii_group"], ui["pii_md"], ui["allow_pii"]],
        )
    _wire_plan(w, demo)
    if "dataset.format" in ctx:  # preference data trains with DPO, other data with SFT
        ctx["dataset.format"].change(
            objective_for_format, [ctx["dataset.format"], ui["objective"]], ui["objective"]
        )
    if "model.name" in ctx:  # one model for the run: this picker and the Hardware tab's agree
        ui["model"].input(lambda m: m, ui["model"], ctx["model.name"], show_progress="hidden")
        ctx["model.name"].change(
            lambda m: m, ctx["model.name"], ui["model"], show_progress="hidden"
        )
    ui["start"].click(
        partial(start, w), {*inputs, ui["all_gpus"]}, [ui["notice"], ui["pii_group"], ui["pii_md"]]
    )
    ui["stop"].click(stop, None, ui["notice"])
    ui["resume"].click(resume, [ui["resume_dd"], ui["all_gpus"]], ui["notice"])
    ui["retry"].click(partial(retry, w), None, [*(ui[name] for name in FIELDS), ui["notice"]])
    ui["refresh"].click(past_runs_updates, None, past_outputs)
    ui["overlay_dd"].change(overlay, ui["overlay_dd"], ui["compare"])
    ui["timer"].tick(
        partial(poll, w),
        [ui["seen"], w.refresh_signal, ui["drawn"]],
        w.poll_outputs(),
        show_progress="hidden",
    )


def _wire_plan(w: TrainWiring, demo: Any) -> None:
    """The recipe plan and pre-flight: redone when the model, data, preset or batch changes,
    or when the user types into a planned field (which the plan then leaves alone). Typing
    into any field marks it as the user's (see the module docstring)."""
    ui = w.ui
    inputs = {*w.inputs(), ui["edited"]}
    quiet = {"trigger_mode": "always_last", "show_progress": "hidden"}
    for name in FIELDS:
        marked = ui[name].input(
            partial(mark_edited, name), ui["edited"], ui["edited"], show_progress="hidden"
        )
        if name in PLAN_FIELDS:
            marked.then(partial(plan_update, w), inputs, w.plan_outputs(), **quiet)
    triggers = [c.change for c in w.cross.values()] + [ui[n].change for n in PLAN_INPUTS]
    gr.on(triggers, partial(plan_update, w), inputs, w.plan_outputs(), **quiet)
    if demo is not None:
        demo.load(partial(plan_update, w), inputs, w.plan_outputs())


# --- handlers -----------------------------------------------------------------------------------


def objective_for_format(fmt: str | None, objective: str | None) -> Any:
    """The objective that fits the loaded data: DPO for preference pairs, SFT for chat rows
    (DPO cannot train on those); unchanged when it already fits."""
    wanted = "dpo" if fmt == "preference" else "sft"
    if fmt is None or objective == wanted:
        return gr.skip()
    return wanted


def mark_edited(name: str, edited: list[str] | None) -> list[str]:
    """Remember that the user typed into a field: from now on their value wins over the fills
    they did not ask for. Changed in place, for the handlers already holding the list."""
    if not isinstance(edited, list):
        edited = []
    if name not in edited:
        edited.append(name)
    return edited


def plan_update(w: TrainWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    """The plan's line and pre-flight, and the planned values of the fields not edited."""
    settings, extras = w.read(values)
    live = values.get(w.ui["edited"])
    edited = set(live or [])
    try:
        cfg = config_from_ui(settings, extras)
    except ConfigError as exc:
        return {w.ui["plan"]: f"Pre-flight waits for a valid setting: `{exc.field}`."}
    from studio.models.loader import cached_tokenizer

    tok, why = cached_tokenizer(cfg.base_model)
    planned = plan_run(cfg, tok, edited)
    if tok is None:
        planned.problems.append(f"no pre-flight: the model's tokenizer is not available ({why})")
    typed_meanwhile = set(live or []) - edited  # typed while this plan was being made
    fills = {w.ui[k]: v for k, v in planned.settings.items() if k not in typed_meanwhile}
    shown = (edited | typed_meanwhile) & set(PLAN_FIELDS)  # the plan's own fields kept
    return {w.ui["plan"]: plan_markdown(planned, shown), **fills}


def preview(w: TrainWiring, values: dict[Any, Any]) -> tuple[str, str]:
    """The run config as YAML, and the line naming the model, dataset and preset."""
    settings, extras = w.read(values)
    try:
        cfg = config_from_ui(settings, extras)
    except ConfigError as exc:
        return f"# not valid yet: {exc}\n", f"⚠️ Setting `{exc.field}`: {exc}"
    data = Path(cfg.dataset_path).name if cfg.dataset_path else _sample_name(cfg)
    preset = f" · preset **{cfg.preset}**" if cfg.preset else ""
    return cfg.to_yaml(), f"Base model **{cfg.base_model}** · dataset **{data}**{preset}"


def _sample_name(cfg: RunConfig) -> str:
    """What a run with no dataset picked trains on."""
    return "the bundled preference sample" if cfg.objective == "dpo" else "the bundled sample"


def start(w: TrainWiring, values: dict[Any, Any]) -> tuple[Any, Any, Any]:
    """Start a run; returns (notice, PII group, PII text)."""
    settings, extras = w.read(values)
    pii = extras.get("dataset.pii_count") or 0
    try:
        get_manager().check_idle()  # busy first: no PII question when nothing can start
        cfg = config_from_ui(settings, extras)
        if cfg.objective == "dpo" and not cfg.dataset_path:
            pii = 0  # the count is the chat sample's; the engine's gate scans the pairs' own
        if pii and not cfg.allow_pii:
            gr.Warning("Confirm the PII findings first (or redact them in the Dataset tab).")
            group, text, _ = pii_notice(pii)
            return f"**Not started.** {text}", group, text
        run_dir = get_manager().start(cfg, processes=_processes(values.get(w.ui["all_gpus"])))
    except ConfigError as exc:
        gr.Warning(f"Setting {exc.field}: {exc}")
        # The engine's own PII gate (a file this page never scanned): offer the confirmation.
        group = gr.Group(visible=True) if exc.field == "allow_pii" else gr.skip()
        return f"❌ **Not started.** Setting `{exc.field}`: {exc}", group, gr.skip()
    except JobBusyError as exc:
        gr.Warning(str(exc))
        return f"⏳ **Not started.** {exc}", gr.skip(), gr.skip()
    return f"▶️ Started **{run_dir.name}**.", gr.skip(), gr.skip()


def stop() -> str:
    if get_manager().stop():
        return "⏹️ Stop requested: the run ends after the current step and keeps its adapter."
    return "No run is training."


def _processes(all_gpus: bool | None) -> int:
    """1 (the default, one device), or every offered GPU through accelerate when ticked."""
    n = distributed.offered_processes()
    return n if all_gpus and n >= 2 else 1


def resume(run_dir: str | None, all_gpus: bool | None = False) -> str:
    if not run_dir:
        return "Pick a run to resume first."
    try:
        path = get_manager().resume(run_dir, processes=_processes(all_gpus))
    except (ConfigError, JobBusyError) as exc:
        gr.Warning(str(exc))
        return f"❌ **Not resumed.** {exc}"
    return f"▶️ Resuming **{path.name}** from its last checkpoint."


def retry(w: TrainWiring) -> dict[Any, Any]:
    """Start the failed run again with the suggested settings, and show them."""
    notice = w.ui["notice"]
    snap = get_manager().snapshot()
    if not snap.retry_config:
        return {notice: "Nothing to retry."}
    try:
        cfg = RunConfig.from_dict(snap.retry_config)
        run_dir = get_manager().start(cfg)
    except (ConfigError, JobBusyError) as exc:
        return {notice: f"❌ **Retry not started.** {exc}"}
    fills = {w.ui[name]: getattr(cfg, name) for name in FIELDS}
    return {**fills, notice: f"▶️ Retrying as **{run_dir.name}** with the suggested settings."}


def poll(w: TrainWiring, seen: int, signal: int, drawn: str = "") -> dict[Any, Any]:
    """Redraw from the job's snapshot when it changed since this browser tab last drew; the
    chart only when its points changed (a message or a checkpoint line leaves it alone)."""
    snap = get_manager().snapshot()
    if snap.version == seen:
        return {comp: gr.skip() for comp in w.poll_outputs()}
    finished = not snap.active and snap.finished_at is not None
    ui = w.ui
    curve = f"{snap.run_dir}:{len(snap.history)}"
    out: dict[Any, Any] = {
        ui["progress"]: progress_markdown(snap),
        ui["chart"]: live_figure(snap) if curve != drawn else gr.skip(),
        ui["drawn"]: curve,
        ui["log"]: "\n".join(snap.log_lines[-200:]),
        ui["run_dir"]: snap.run_dir or "",
        ui["result"]: result_markdown(snap),
        ui["retry"]: gr.Button(visible=bool(snap.retry_config) and snap.state == "failed"),
        ui["seen"]: snap.version,
        w.refresh_signal: signal + 1 if finished else gr.skip(),  # Chat/Export refresh lists
    }
    past = past_runs_updates() if finished else [gr.skip()] * 3
    out.update(zip(w.past_outputs(), past, strict=True))
    return out


def overlay(selected: list[str] | None) -> Any:
    from studio.plots import loss_figure

    curves = {Path(p).name: runs.load_log(p) for p in selected or []}
    return loss_figure(curves, title="Compare runs")


# --- handlers' helpers (plain functions, testable without a browser) ---------------------------


def config_from_ui(values: dict[str, Any], extras: dict[str, Any]) -> RunConfig:
    """A RunConfig from the widgets plus the other tabs' model, dataset and preset."""
    data: dict[str, Any] = {}
    for name, value in values.items():
        optional = name in ("run_name", "init_adapter")
        if value is None or (isinstance(value, str) and not value.strip() and not optional):
            raise ConfigError(name, "enter a value")
        data[name] = value
    data["base_model"] = extras.get("model.name") or DEFAULT_MODEL
    data["dataset_path"] = extras.get("dataset.path") or ""
    data["dataset_format"] = extras.get("dataset.format") or "auto"
    data["preset"] = extras.get("hardware.preset") or ""
    data["gpu_index"] = extras.get("hardware.gpu") or 0
    return RunConfig.from_dict(data)


def plan_markdown(planned: RunPlan, edited: set[str]) -> str:
    """The plan's line, the pre-flight as a short list, and what kept the plan out."""
    blocks = []
    if planned.line:
        kept = f" (your own {', '.join(sorted(edited))} kept)" if edited else ""
        blocks.append(f"**Recipe:** {planned.line}{kept}")
    if planned.preflight is not None:
        lines = "\n".join(f"- {line}" for line in planned.preflight.lines())
        blocks.append(f"**Pre-flight**\n\n{lines}")
    blocks += [f"_{p}_" for p in planned.problems]
    return "\n\n".join(blocks)


def pii_notice(count: int | None):
    """Show the confirmation when the dataset changes to one with findings; a new dataset
    always needs a new confirmation, so the box is cleared."""
    if not count:
        return gr.Group(visible=False), "", False
    text = (
        f"⚠️ The dataset has **{count}** unresolved personal-data finding(s) (emails, phone "
        "numbers, IDs). Redact them in the Dataset tab, or confirm below to train anyway."
    )
    return gr.Group(visible=True), text, False


def past_runs_updates():
    """Rows for the past-runs table and choices for the resume and overlay pickers."""
    infos = runs.list_runs()
    rows = [
        [
            r.name,
            r.status,
            r.method_words,
            r.base_model.rsplit("/", 1)[-1],
            f"{r.steps}/{r.total_steps}" if r.total_steps else str(r.steps),
            _fmt(r.train_loss),
            _fmt(r.eval_loss),
            r.created.replace("T", " "),
        ]
        for r in infos
    ]
    resumable = [
        (f"{r.name} ({r.status})", str(r.path))
        for r in infos
        # an interrupted run with no checkpoint yet resumes from step 0 (prepare_resume)
        if r.status in RESUMABLE
        and (r.status == "interrupted" or runs.latest_checkpoint(r.path) is not None)
    ]
    curves = [(r.label, str(r.path)) for r in infos]
    return (
        gr.Dataframe(value=rows or [[""] * len(RUN_HEADERS)], headers=RUN_HEADERS),
        gr.Dropdown(choices=resumable, value=resumable[0][1] if resumable else None),
        gr.Dropdown(choices=curves),
    )


def live_figure(snap: JobSnapshot):
    from studio.plots import loss_figure

    title = f"Loss · {snap.run_name}" if snap.run_name else "Loss"
    return loss_figure({snap.run_name or "run": snap.history}, title=title)


def progress_markdown(snap: JobSnapshot) -> str:
    if snap.state == "idle":
        return "No run yet. Press **Start training**."
    state = {
        "running": "🟢 Training",
        "stopping": "🟡 Stopping",
        "completed": "✅ Completed",
        "stopped": "⏹️ Stopped",
        "failed": "❌ Failed",
    }.get(snap.state, snap.state)
    total = snap.total_steps or 0
    frac = snap.step / total if total else 0.0
    bar = "▰" * round(frac * 20) + "▱" * (20 - round(frac * 20))
    lines = [
        f"**{state}** · `{snap.run_name}` · {snap.method}"
        + (f" · {snap.processes} processes (accelerate)" if snap.processes > 1 else ""),
        f"{bar} step **{snap.step}/{total or '?'}** ({frac:.0%})"
        + (f" · epoch {snap.epoch:.2f}" if snap.epoch is not None else ""),
        f"train loss **{_fmt(snap.train_loss)}** · eval loss **{_fmt(snap.eval_loss)}** · "
        f"lr {snap.learning_rate or 0:.2e} · {_speed(snap)}",
        f"elapsed {_duration(snap.elapsed_s)} · ETA "
        f"{_duration(snap.eta_s) if snap.active and snap.eta_s is not None else '-'}"
        + (
            f" · peak memory {snap.peak_memory_mb / 1024:.2f} GiB ({snap.memory_kind})"
            if snap.peak_memory_mb
            else ""
        ),
    ]
    if snap.energy_kwh is not None:
        note = f"{snap.power_w:g} W" if snap.power_w else "0 W: pick a hardware preset"
        lines.append(
            f"electricity ≈ {snap.energy_kwh:.4f} kWh ≈ {snap.energy_cost or 0:.4f} ({note})"
        )
    if snap.active and (warning := fallback.sysmem_fallback_warning(snap.history)):
        lines.append(warning)  # Windows: the driver spills VRAM into RAM instead of an OOM
    if snap.active and snap.message and (snap.step == 0 or snap.state == "stopping"):
        # before step 1: what the wait is (loading model, tokenizing N rows, first step)
        lines.append(f"_{snap.message}_")
    return "  \n".join(lines)


def _speed(snap: JobSnapshot) -> str:
    """Trained tokens/s: while training, the latest steps' rate; once the run ended, its real
    average (trained tokens over the whole training time, evals and checkpoints included),
    the `avg_tokens_per_s` of its last log line, so the tab and the log agree."""
    last = next((e for e in reversed(snap.history) if e.get("kind") == "train"), {})
    avg = last.get("avg_tokens_per_s")
    if not snap.active and avg is not None:
        return f"{avg:.0f} trained tokens/s on average"
    rate = f"{snap.tokens_per_s or 0:.0f} trained tokens/s"
    return f"{rate} (average {avg:.0f})" if avg is not None else rate


def result_markdown(snap: JobSnapshot) -> str:
    """How the last run ended: the message, the "did it learn?" checks, advice, the adapter."""
    if snap.active or snap.state == "idle":
        return ""
    blocks = [f"**{snap.message}**"]
    if snap.checks:  # verdict marks, what to change, the example pair: as in the model card
        blocks.append("**Did it learn?**\n\n" + "\n".join(checks.check_lines(snap.checks)))
    if snap.advice:
        blocks.append("**What to do:**\n\n" + "\n".join(f"- {line}" for line in snap.advice))
    if snap.run_dir and snap.state in ("completed", "stopped"):
        blocks.append(f"Adapter: `{Path(snap.run_dir) / runs.ADAPTER}`")
    return "\n\n".join(blocks)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
