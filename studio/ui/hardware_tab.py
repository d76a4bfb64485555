"""Hardware tab: detected GPU, preset and model pickers, VRAM fit estimate, environment check.

Choosing a preset or a model fills the Train tab's settings (still editable there); changing
any of those settings re-estimates. Detection and the environment check run when the page
loads, not at start-up, so the app serves at once; the preset detection picks fills only the
Train fields the user has not typed into meanwhile (the user did not ask for that fill), while
a preset or model the user picks fills them all and says which typed values it replaced. The
engine (studio.hardware: presets, detect, vram, doctor; figures from studio.plots) does the
work; this module only turns its plain data into components.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from studio.config import DEFAULT_MODEL
from studio.hardware import longctx, vram
from studio.hardware.presets import BAND_LABELS, PresetCatalog, band_for, defaults_for, load_presets
from studio.plots import vram_figure

# The Train tab's fields this tab fills and watches (RunConfig names, as "train.<name>").
SETTING_FIELDS = (
    "method",
    "batch_size",
    "grad_accum",
    "max_seq_len",
    "gradient_checkpointing",
    "optimizer",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
)
# The Train tab's long-context switches: read by the estimate (its 🧩 lines follow them), never
# filled by a preset (they are the run's choices, "auto" by default).
WATCHED_FIELDS = ("activation_offloading", "liger_kernels", "tiled_mlp")
_STATUS_ICON = {"ok": "✅", "warning": "⚠️", "problem": "❌"}
GIB = vram.GIB


def _catalog() -> PresetCatalog:
    return load_presets()


def _preset_choices(catalog: PresetCatalog) -> list[tuple[str, str]]:
    ordered = sorted(
        catalog.presets.values(), key=lambda p: (p.user, p.kind == "cpu", p.vram_gb, p.name)
    )
    return [(p.label + (" (yours)" if p.user else ""), p.name) for p in ordered]


_FIT_ICON = {"fits": "✅", "tight": "⚠️", "won't fit": "❌"}


def model_choices(
    preset_name: str | None = "cpu", report: dict[str, Any] | None = None
) -> list[tuple[str, str]]:
    """The picker's list: every catalogue model (and 4-bit twin) with its size, download and
    fit on the chosen card for LoRA and QLoRA; the embedded default first."""
    from studio.hardware.picker import picker_rows
    from studio.models.catalog import size_text

    catalog = _catalog()
    try:
        preset = catalog.get(preset_name or "cpu")
        capacity, in_use, _how, device = _memory_target(preset.name, catalog, report)
        rows = picker_rows(preset, capacity_bytes=capacity, in_use_bytes=in_use, device=device)
    except KeyError:  # no such preset (a user's preset file was removed): sizes only
        rows = []
    rows.sort(key=lambda r: r.model_id != DEFAULT_MODEL)  # stable: the rest stay by size
    choices = []
    for r in rows:
        label = f"{r.model_id.split('/')[-1]} · {vram.format_params(r.n_params)}"
        label += f" · {size_text(r.download_bytes)}"
        if r.lora is None:
            label += f" · 4-bit: QLoRA {_FIT_ICON[r.qlora]}"
        else:
            label += f" · LoRA {_FIT_ICON[r.lora]} QLoRA {_FIT_ICON[r.qlora]}"
        if r.gated:
            label += " · gated"
        if r.model_id == DEFAULT_MODEL:
            label += " · default, works offline"
        choices.append((label, r.model_id))
    return choices


# --------------------------------------------------------------------------- formatting


def detected_markdown(report: dict[str, Any] | None) -> str:
    if not report:
        return "**Detecting hardware…**"
    lines = [
        f"**Device:** {report['device']['reason']}",
        f"**Precision:** {report['dtype']['reason']}",
    ]
    for gpu in report["gpus"]:
        free = gpu.get("free_bytes")
        free_text = f", {free / GIB:.1f} GiB free now" if free is not None else ""
        lines.append(
            f"**GPU {gpu['index']}:** {gpu['name']} · {gpu['total_bytes'] / GIB:.1f} GiB{free_text}"
            f" · compute capability {gpu['cc']}"
        )
    lines.append(f"**Preset:** {report['preset']['reason']}")
    lines += [f"ℹ️ {note}" for note in report.get("notes", [])]
    return "\n\n".join(lines)


def checks_markdown(checks: list[dict[str, Any]] | None) -> str:
    if checks is None:
        return "Running the environment check…"
    rows = ["| | Check | Result | Fix |", "|---|---|---|---|"]
    for c in checks:
        cells = [_STATUS_ICON.get(c["status"], c["status"]), c["name"], c["detail"], c["fix"]]
        rows.append("| " + " | ".join(str(x).replace("|", "/") for x in cells) + " |")
    return "\n".join(rows)


def _verdict_markdown(est: vram.VramEstimate, in_use_note: str) -> str:
    icon = {"fits": "✅", "tight": "⚠️", "won't fit": "❌"}.get(est.verdict, "❔")
    head = f"### {icon} {est.verdict.capitalize()}: {est.summary()}"
    rows = ["| Part | GiB | How |", "|---|---:|---|"]
    rows.append(f"| {vram.PART_LABELS['in_use']} | {est.in_use_bytes / GIB:.2f} | {in_use_note} |")
    rows += [f"| {p.label} | {p.gib:.2f} | {p.detail} |" for p in est.parts]
    notes = [f"ℹ️ {n}" for n in est.notes]
    return "\n\n".join([head, "\n".join(rows), *notes])


# --------------------------------------------------------------------------- handlers


def _memory_target(
    preset_name: str, catalog: PresetCatalog, report: dict[str, Any] | None, gpu_index: int = 0
) -> tuple[int, int, str, str]:
    """(capacity, in use, how 'in use' was found, device) for the estimate, on the card
    picked to train (`gpu_index`), not always GPU 0."""
    preset = catalog.get(preset_name)
    if preset.kind == "cpu":
        from studio.hardware.detect import estimate_kernel, ram_used_by_others, system_ram

        how = "RAM used by other programs, measured"
        return system_ram()[0], ram_used_by_others(), how, estimate_kernel("cpu")
    from studio.hardware.detect import closest_preset

    gpus = (report or {}).get("gpus") or []
    gpu = next((g for g in gpus if g.get("index") == gpu_index), gpus[0] if gpus else None)
    detected = gpu and closest_preset(catalog, gpu.get("name"), gpu.get("total_bytes")).value
    if gpu and detected == preset.name and gpu.get("free_bytes") is not None:
        used = gpu.get("used_bytes")  # other programs' use: the app's own context not counted
        return (
            int(gpu["total_bytes"]),
            int(gpu["total_bytes"] - gpu["free_bytes"] if used is None else used),
            "measured on your card",
            "cuda",
        )
    return (
        preset.vram_bytes,
        vram.TYPICAL_DESKTOP_USE,
        "typical desktop use (not measured: this card is not here)",
        "cuda",
    )


def _compact_head_here() -> bool:
    """Whether this machine's GPU runs use the compact head (not TRL's Triton one)."""
    from studio.hardware.detect import compact_head_on

    return compact_head_on("cuda", probe=False)  # a cached Triton verdict: no compile here


def model_markdown(model: str) -> str:
    try:
        shape = vram.model_shape(model)
    except vram.ModelShapeError as exc:
        return f"⚠️ {exc}"
    band = BAND_LABELS[band_for(shape.n_params)]
    text = (
        f"**{model}**: {vram.format_params(shape.n_params)} parameters ({band} band),"
        f" {shape.num_layers} layers, hidden {shape.hidden_size}, vocab {shape.vocab_size:,}"
        f" · from the {shape.source}"
    )
    return text + _catalog_line(model)


def _catalog_line(model: str) -> str:
    """Download size, licence, gating and the 4-bit twin, from the catalogue."""
    from studio.models.catalog import is_prequantized, lookup, original_of, size_text

    entry = lookup(model)
    if entry is None:
        return ""
    twin = is_prequantized(model)
    size = (entry.bnb_4bit_gb or 0) * 10**9 if twin else entry.download_bytes
    parts = [f"download {size_text(size)}", f"licence `{entry.licence}`"]
    parts.append(f"template {entry.template}")
    if twin:
        parts.append(f"pre-quantized 4-bit copy of {original_of(model)}: QLoRA only")
    elif entry.gated:
        parts.append(f"gated: accept the licence on [its page]({entry.page}), then add a token")
    if entry.bnb_4bit and not twin:
        parts.append(f"4-bit twin for QLoRA: `{entry.bnb_4bit}`")
    return "\n\n" + " · ".join(parts)


def estimate_view(
    preset_name: str | None,
    model: str | None,
    settings: dict[str, Any],
    report: dict[str, Any] | None,
) -> tuple[str, Any]:
    """Verdict markdown and chart for the current choices; errors become a message."""
    if not preset_name:
        return "Choose a preset.", None
    try:
        catalog = _catalog()
        shape = vram.model_shape(model or DEFAULT_MODEL)
        gpu_index = int(settings.get("gpu_index") or 0)
        capacity, in_use, how, device = _memory_target(preset_name, catalog, report, gpu_index)
        options = longctx.choose(
            shape,
            settings,
            longctx.detect_for(device, probe=False),  # a cached Triton verdict: no compile here
            capacity_bytes=capacity,
            in_use_bytes=in_use,
            device=device,
            compact_head=how == "measured on your card" and _compact_head_here(),
        )
        est = options.estimate
    except (vram.ModelShapeError, ValueError, KeyError) as exc:
        return f"### ❔ No estimate\n\n{exc}", None
    label = catalog.get(preset_name).label
    fig = vram_figure(est, capacity / GIB)
    fig.update_layout(title={"text": f"{label} · {shape.name.split('/')[-1]}: {est.verdict}"})
    return _verdict_markdown(est, how) + _options_markdown(options) + ddp_markdown(est, report), fig


def _options_markdown(options: longctx.LongContext) -> str:
    """The long-context options the estimate assumed, on or off, and why."""
    return "\n\n" + "\n\n".join(f"🧩 {line}" for line in options.lines())


def ddp_markdown(est: vram.VramEstimate, report: dict[str, Any] | None) -> str:
    """With 2+ GPUs: the memory per card when all of them train the run (DDP)."""
    gpus = (report or {}).get("gpus") or []
    if len(gpus) < 2 or est.device != "cuda":
        return ""
    from studio.hardware.vram import ddp_per_gpu

    d = ddp_per_gpu(est.total_bytes, est.trainable_params, gpus)
    return (
        f"\n\n**With all {d['gpus']} GPUs (DDP):** {d['per_gpu_bytes'] / GIB:.2f} GiB on each"
        f" card ({d['verdict']} on the card with the least free memory, {d['tightest']},"
        f" {d['available_bytes'] / GIB:.1f} GiB free): every card holds the whole model and"
        " its own batch, plus DDP's gradient buckets and NCCL buffers; the effective batch is"
        " multiplied by the cards."
    )


def _fill(preset_name: str | None, model: str | None, current: dict[str, Any]) -> dict[str, Any]:
    """The preset's defaults for this model's size band (current settings if either is unknown)."""
    if not preset_name:
        return dict(current)
    try:
        shape = vram.model_shape(model or DEFAULT_MODEL)
        preset = _catalog().get(preset_name)
    except (vram.ModelShapeError, KeyError):
        return dict(current)
    return {**current, **defaults_for(preset, shape.n_params)}


def _initial_settings() -> dict[str, Any]:
    catalog = _catalog()
    cpu = next((p for p in catalog.presets.values() if p.kind == "cpu"), None)
    if cpu is None:
        from studio.config import RunConfig

        cfg = RunConfig()
        return {name: getattr(cfg, name) for name in SETTING_FIELDS}
    shape = vram.model_shape(DEFAULT_MODEL)
    return defaults_for(cpu, shape.n_params)


# --------------------------------------------------------------------------- build and wire


def build_hardware_tab(ctx: dict[str, Any]) -> dict[str, Any]:
    """Create the tab's components inside the open gr.Tab; returns them by name.

    Registers "model.name", "hardware.preset", "hardware.report" and "hardware.settings" in
    ctx for the other tabs.
    """
    catalog = _catalog()
    ui: dict[str, Any] = {}
    gr.Markdown(
        "Pick your GPU and base model: the studio fills the Train tab's settings and checks"
        " that the run fits in memory before you start it."
    )
    ui["detected"] = gr.Markdown(detected_markdown(None), elem_id="hw-detected")
    with gr.Row():
        ui["preset"] = gr.Dropdown(
            choices=_preset_choices(catalog),
            value="cpu" if "cpu" in catalog.presets else None,
            label="Hardware preset",
            info="Detected on page load; pick another card to plan for it.",
            elem_id="hw-preset",
            interactive=True,
        )
        ui["model"] = gr.Dropdown(
            choices=model_choices(),
            value=DEFAULT_MODEL,
            label="Base model",
            info="A listed model, a hub id, or a local folder with config.json.",
            allow_custom_value=True,
            elem_id="hw-model",
            interactive=True,
        )
    ui["gpu"] = gr.Dropdown(
        choices=[("GPU 0", 0)],
        value=0,
        label="GPU to train on",
        info="This PC has several NVIDIA cards; a run trains on one.",
        elem_id="hw-gpu",
        visible=False,
        interactive=True,
    )
    ui["model_info"] = gr.Markdown(model_markdown(DEFAULT_MODEL), elem_id="hw-model-info")
    _build_download(ui)
    ui["verdict"] = gr.Markdown("Estimating…", elem_id="hw-verdict")
    ui["chart"] = gr.Plot(label="Estimated peak memory", elem_id="hw-chart")
    with gr.Row():
        ui["autofit"] = gr.Button("Auto-fit", variant="secondary", elem_id="hw-autofit", scale=0)
        ui["autofit_msg"] = gr.Markdown(
            "Auto-fit picks the largest batch (then sequence length) that fits with 10% to"
            " spare, raising gradient accumulation to keep the effective batch.",
            elem_id="hw-autofit-msg",
        )
    with gr.Accordion("Environment check (running…)", open=False) as ui["checks_box"]:
        ui["checks"] = gr.Markdown(checks_markdown(None), elem_id="hw-checks")
        ui["recheck"] = gr.Button("Run the checks again", size="sm")
    ui["presets_note"] = gr.Markdown(_presets_note(catalog), elem_id="hw-presets-note")
    ui["report"] = gr.State(None)
    ui["settings"] = gr.State(_initial_settings())
    ctx["model.name"] = ui["model"]
    ctx["hardware.preset"] = ui["preset"]
    ctx["hardware.report"] = ui["report"]
    ctx["hardware.settings"] = ui["settings"]
    ctx["hardware.gpu"] = ui["gpu"]
    return ui


def _build_download(ui: dict[str, Any]) -> None:
    """Download the picked model now (bytes, speed, ETA, Cancel), and the hub token."""
    from studio.models.hub import cache_dir

    with gr.Row():
        ui["download"] = gr.Button("Download model", elem_id="hw-download", scale=0)
        ui["cancel"] = gr.Button("Cancel download", elem_id="hw-cancel", scale=0)
        ui["download_md"] = gr.Markdown(
            f"Hub models download into `{cache_dir()}` (huggingface_hub's cache); a stopped"
            " download continues where it stopped.",
            elem_id="hw-download-progress",
        )
    ui["download_timer"] = gr.Timer(1.0, active=False)
    with gr.Accordion("Hugging Face token (gated models: Llama, Gemma, Mistral)", open=False):
        with gr.Row():
            ui["token"] = gr.Textbox(
                label="Read token",
                type="password",
                placeholder="hf_…",
                elem_id="hw-token",
                scale=3,
            )
            ui["token_save"] = gr.Button("Save token", elem_id="hw-token-save", scale=0)
        ui["token_md"] = gr.Markdown(
            "Stored where huggingface_hub keeps it (as `hf auth login` does), never in the"
            " studio's runs or logs.",
            elem_id="hw-token-status",
        )


def gpu_choices(report: dict[str, Any]) -> list[tuple[str, int]]:
    """The detected cards for the GPU picker ("GPU 1: RTX 3090, 24.0 GiB")."""
    return [
        (f"GPU {g['index']}: {g['name']}, {g['total_bytes'] / GIB:.1f} GiB", int(g["index"]))
        for g in report.get("gpus") or []
    ]


def _presets_note(catalog: PresetCatalog) -> str:
    from studio.hardware.presets import user_presets_dir

    text = (
        f"Your own presets: copy a file from the repo's `presets/` into `{user_presets_dir()}`,"
        " edit it, and reload the page."
    )
    if catalog.problems:
        text += "\n\n" + "\n\n".join(f"⚠️ Preset not loaded: {p}" for p in catalog.problems)
    if catalog.notices:
        text += "\n\n" + "\n\n".join(f"ℹ️ {n}" for n in catalog.notices)
    return text


def run_checks(ui: dict[str, Any]) -> dict[Any, Any]:
    """The environment check's table, and its accordion labelled with the counts."""
    from studio.hardware.doctor import checks_as_dicts

    found = checks_as_dicts()
    counts = {s: sum(c["status"] == s for c in found) for s in ("ok", "warning", "problem")}
    label = (
        f"Environment check: {counts['ok']} ok · {counts['warning']} warning(s) ·"
        f" {counts['problem']} problem(s)"
    )
    box = gr.Accordion(label=label, open=counts["problem"] > 0)
    return {ui["checks"]: checks_markdown(found), ui["checks_box"]: box}


@dataclass
class HardwareWiring:
    """The tab's components by name and the Train tab's fields it fills ("train.<name>")."""

    ui: dict[str, Any]
    train: dict[str, Any]  # SETTING_FIELDS name -> the Train tab's component, where present
    edited: Any = None  # the Train tab's "train.edited" State (fields the user typed into)
    note: Any = None  # the Train tab's "train.fill_note" Markdown (what a fill did)
    watched: dict[str, Any] = field(default_factory=dict)  # WATCHED_FIELDS, read only

    def inputs(self) -> set[Any]:
        """What every handler reads: pickers, detection report, settings, Train fields."""
        ui = self.ui
        mine = {ui["preset"], ui["model"], ui["settings"], ui["report"]}
        mine |= {ui["gpu"]} if "gpu" in ui else set()
        return (
            mine | set(self.train.values()) | set(self.watched.values()) | ({self.edited} - {None})
        )

    def typed(self, values: dict[Any, Any]) -> list[str]:
        """The Train fields the user typed into: the session's own list, so marks made while
        a slow handler ran (typing during detection) are seen when it reads this at its end."""
        got = values.get(self.edited) if self.edited is not None else None
        return got if isinstance(got, list) else []

    def read(self, values: dict[Any, Any]) -> tuple[str | None, str | None, dict, Any]:
        """(preset, model, settings merged with the Train fields, detection report)."""
        ui = self.ui
        settings = dict(values.get(ui["settings"]) or {})
        for key, comp in {**self.train, **self.watched}.items():
            if values.get(comp) is not None:
                settings[key] = values[comp]
        if values.get(ui.get("gpu")) is not None:  # the card that trains: the estimate's
            settings["gpu_index"] = int(values[ui["gpu"]])
        return values.get(ui["preset"]), values.get(ui["model"]), settings, values.get(ui["report"])

    def view(self, p: str | None, m: str | None, settings: dict, report: Any) -> dict[Any, Any]:
        text, fig = estimate_view(p, m, settings, report)
        return {self.ui["verdict"]: text, self.ui["chart"]: fig}

    def settings_out(self, new: dict[str, Any], keep: Iterable[str] = ()) -> dict[Any, Any]:
        """The settings state and the Train tab's fields set to `new`, but for `keep`."""
        fields = {c: gr.skip() if k in keep else new.get(k) for k, c in self.train.items()}
        return {self.ui["settings"]: new, **fields}

    def note_out(self, text: Any) -> dict[Any, Any]:
        return {self.note: text} if self.note is not None else {}


def wire_hardware_tab(ctx: dict[str, Any], ui: dict[str, Any]) -> None:
    """Fill the Train tab's fields from presets/models; re-estimate when any of them changes."""
    # The Train tab may not exist yet (or may lack a field): fill and watch what is there.
    train_fields = {k: ctx[f"train.{k}"] for k in SETTING_FIELDS if f"train.{k}" in ctx}
    watched = {k: ctx[f"train.{k}"] for k in WATCHED_FIELDS if f"train.{k}" in ctx}
    w = HardwareWiring(
        ui, train_fields, ctx.get("train.edited"), ctx.get("train.fill_note"), watched
    )
    inputs, train = w.inputs(), list(w.train.values())
    note = [w.note] if w.note is not None else []
    fill_outputs = [ui["settings"], *train, ui["model_info"], ui["verdict"], ui["chart"], *note]
    quiet = {"trigger_mode": "always_last", "show_progress": "hidden"}
    checks_out = [ui["checks"], ui["checks_box"]]
    ctx["demo"].load(partial(run_checks, ui), outputs=checks_out, show_progress="hidden")
    ui["recheck"].click(partial(run_checks, ui), outputs=checks_out)
    # Detection's fill is automatic: it leaves the fields typed into meanwhile alone, so its
    # one estimate comes after it, from the fields as they then are.
    ctx["demo"].load(
        partial(on_page_load, w),
        inputs=inputs,
        outputs=[
            ui["detected"],
            ui["preset"],
            ui["report"],
            ui["presets_note"],
            ui["gpu"],
            *fill_outputs,
        ],
    ).then(
        partial(on_settings_change, w),
        inputs=inputs,
        outputs=[ui["settings"], ui["verdict"], ui["chart"]],
        show_progress="hidden",
    )
    # Picks one at a time: one pick can arrive as two `.input` events (seen 27 ms apart), and a
    # repeat running beside the first would not see that it already replaced typed values.
    picks = {**quiet, "concurrency_limit": 1, "concurrency_id": "hardware-pick"}
    ui["preset"].input(partial(on_pick, w), inputs=inputs, outputs=fill_outputs, **picks)
    # A new model (only the user sets it: no event writes this picker) gets its band's
    # settings and then one estimate: a second listener estimating with the previous band's
    # settings raced the fill and flashed a wrong verdict ("Won't fit" for an 8B model on its
    # own QLoRA band).
    ui["model"].change(partial(on_pick, w), inputs=inputs, outputs=fill_outputs, **picks)
    # The card picked to train: the estimate measures that card (free memory, its preset).
    estimate_out = [ui["settings"], ui["verdict"], ui["chart"]]
    ui["gpu"].input(partial(on_settings_change, w), inputs=inputs, outputs=estimate_out, **quiet)
    if train or watched:
        # The user's edits only: a fill writes every field and has estimated already; one
        # estimate per filled field read half-updated fields and flashed wrong verdicts.
        gr.on(
            triggers=[c.input for c in [*train, *watched.values()]],
            fn=partial(on_settings_change, w),
            inputs=inputs,
            outputs=[ui["settings"], ui["verdict"], ui["chart"]],
            **quiet,
        )
    _wire_download(ctx, ui)
    ui["autofit"].click(
        partial(on_autofit, w),
        inputs=inputs,
        outputs=[ui["settings"], *train, ui["autofit_msg"], ui["verdict"], ui["chart"]],
        show_progress="hidden",
    )


# --------------------------------------------------------------------------- handlers


def _fill_outputs(
    w: HardwareWiring, values: dict[Any, Any], report: Any, *, picked: bool
) -> dict[Any, Any]:
    """The preset's defaults for the model into the Train fields, and what the fill did.

    picked (the user chose the preset or model): every field is filled, the typed ones that
    change are named in the note, and the estimate follows. Otherwise (detection on page
    load) the fields the user typed into keep their values and the estimate is left to the
    step after, which reads the fields as they are (this one saw them before the typing).
    """
    p, m, settings, _report = w.read(values)
    new = _fill(p, m, settings)
    typed = w.typed(values)  # read now, at the end: typing during detection counts
    out = {w.ui["model_info"]: model_markdown(m or DEFAULT_MODEL)}
    if picked:
        replaced = {k: (settings.get(k), new.get(k)) for k in w.train if k in typed}
        replaced = {k: v for k, v in replaced.items() if v[0] != v[1]}
        typed[:] = [k for k in typed if k not in w.train]  # filled on request: not theirs now
        # One pick can arrive twice with the same values (see wire): the repeat, finding the
        # marks gone and the settings already filled, must not erase the note of the first.
        repeat = not replaced and values.get(w.ui["settings"]) == new
        note = gr.skip() if repeat else fill_note(p, m, replaced=replaced)
        return {**out, **w.settings_out(new), **w.view(p, m, new, report), **w.note_out(note)}
    kept = [k for k in w.train if k in typed]
    note = fill_note(p, m, kept=kept, detected=True)
    skip = {w.ui["verdict"]: gr.skip(), w.ui["chart"]: gr.skip()}
    return {**out, **w.settings_out(new, keep=kept), **skip, **w.note_out(note)}


def fill_note(
    preset_name: str | None,
    model: str | None,
    *,
    kept: Iterable[str] = (),
    replaced: dict[str, tuple[Any, Any]] | None = None,
    detected: bool = False,
) -> str:
    """The Train tab's line on a fill: which preset and band, and the user's values it kept
    (an automatic fill) or replaced (one the user asked for), so neither goes unnoticed."""
    if not preset_name:
        return ""
    try:
        label = _catalog().get(preset_name).label
        n_params = vram.model_shape(model or DEFAULT_MODEL).n_params
    except (vram.ModelShapeError, KeyError):
        return ""
    source = "the detected preset" if detected else "the preset you picked,"
    text = (
        f"Settings filled from {source} **{label}** for a {vram.format_params(n_params)}"
        f" model ({BAND_LABELS[band_for(n_params)]} band)."
    )
    if kept:
        text += f" Your own {', '.join(f'`{k}`' for k in kept)} kept."
    if replaced:
        changes = ", ".join(f"`{k}` {old} → {new}" for k, (old, new) in replaced.items())
        text += f" Replaced what you had typed: {changes}."
    return text


def on_pick(w: HardwareWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    """A preset or model was picked: fill the Train tab from the preset and re-estimate."""
    return _fill_outputs(w, values, values.get(w.ui["report"]), picked=True)


def on_page_load(w: HardwareWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    """Detect the hardware, pick its preset, fill the Train tab and estimate."""
    from studio.hardware.detect import detect

    catalog = _catalog()
    report = detect(catalog).to_dict()
    chosen = report["preset"]["value"]
    return {
        w.ui["detected"]: detected_markdown(report),
        w.ui["preset"]: gr.Dropdown(choices=_preset_choices(catalog), value=chosen),
        w.ui["report"]: report,
        w.ui["presets_note"]: _presets_note(catalog),
        w.ui["gpu"]: gr.Dropdown(
            choices=gpu_choices(report) or [("GPU 0", 0)], value=0, visible=len(report["gpus"]) > 1
        ),
        **_fill_outputs(w, {**values, w.ui["preset"]: chosen}, report, picked=False),
    }


def on_settings_change(w: HardwareWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    p, m, settings, report = w.read(values)
    return {w.ui["settings"]: settings, **w.view(p, m, settings, report)}


def on_autofit(w: HardwareWiring, values: dict[Any, Any]) -> dict[Any, Any]:
    """The largest batch (then length) that fits, into the Train tab."""
    p, m, current, report = w.read(values)
    try:
        shape = vram.model_shape(m or DEFAULT_MODEL)
        gpu_index = int(current.get("gpu_index") or 0)
        capacity, in_use, _how, device = _memory_target(p or "", _catalog(), report, gpu_index)
        result = vram.auto_fit(
            shape, current, capacity_bytes=capacity, in_use_bytes=in_use, device=device
        )
    except (vram.ModelShapeError, ValueError, KeyError) as exc:
        return {
            **w.settings_out(current),
            w.ui["autofit_msg"]: f"⚠️ Auto-fit: {exc}",
            **w.view(p, m, current, report),
        }
    new = {**current, **result.settings}
    icon = "✅" if result.fits else "❌"
    return {
        **w.settings_out(new),
        w.ui["autofit_msg"]: f"{icon} {result.message()}",
        **w.view(p, m, new, report),
    }


# --------------------------------------------------------------------------- picker & download


def _wire_download(ctx: dict[str, Any], ui: dict[str, Any]) -> None:
    """The picker's labels follow the card; Download/Cancel drive the background download."""
    pickers = [ui["model"], *([ctx["train.model"]] if "train.model" in ctx else [])]
    ui["preset"].change(
        partial(on_preset_for_picker, len(pickers)),
        [ui["preset"], ui["report"]],
        pickers,
        show_progress="hidden",
        trigger_mode="always_last",
    )
    timer = ui["download_timer"]
    ui["download"].click(on_download, ui["model"], [ui["download_md"], timer])
    ui["cancel"].click(on_cancel, None, [ui["download_md"], timer])
    timer.tick(
        on_download_tick,
        ui["model"],
        [ui["download_md"], timer, ui["model_info"]],
        show_progress="hidden",
    )
    ui["token_save"].click(on_token_save, ui["token"], [ui["token"], ui["token_md"]])


def on_preset_for_picker(n: int, preset_name: str | None, report: Any) -> list[Any]:
    """New labels (the fit on this card) for the Hardware and Train pickers; values kept."""
    choices = model_choices(preset_name, report)
    return [gr.Dropdown(choices=choices) for _ in range(n)]


def on_download(model: str | None) -> tuple[str, Any]:
    from studio.models.catalog import is_prequantized
    from studio.models.hub import get_download_job

    name = (model or "").strip()
    if name.count("/") != 1 or Path(name).expanduser().exists():
        return "Nothing to download: pick a hub model (owner/name).", gr.Timer(active=False)
    if not get_download_job().start(name):
        return "A download is already running: wait for it or cancel it.", gr.Timer(active=True)
    extra = " (pre-quantized 4-bit: QLoRA only)" if is_prequantized(name) else ""
    return f"Checking **{name}** on the hub{extra}…", gr.Timer(active=True)


def on_cancel() -> tuple[str, Any]:
    """Cancel takes effect at the next chunk; the timer (on again, in case a tick just turned
    it off) then shows how the download ended."""
    from studio.models.hub import get_download_job

    get_download_job().cancel()
    return "Cancelling… the part already downloaded is kept.", gr.Timer(active=True)


def download_markdown(state: dict[str, Any]) -> str:
    """The download's line: progress, or how it ended and what to do."""
    status, repo = state.get("status"), state.get("repo_id", "")
    if status == "downloading":
        return f"⬇️ **{repo}** {state.get('line', '')}"
    if status == "done":
        return f"✅ **{repo}** is on this machine: `{state.get('path', '')}`"
    if status in ("failed", "cancelled"):
        icon = "⏹️" if status == "cancelled" else "❌"
        return f"{icon} " + str(state.get("error", "")).replace("\n", "\n\n")
    return state.get("line", "") or ""


def on_download_tick(model: str | None) -> tuple[str, Any, Any]:
    """The download's line; once the picked model is in, its info (now read from its own
    config.json) is shown again."""
    from studio.models.hub import get_download_job

    state = get_download_job().snapshot()
    running = state.get("status") in ("checking", "downloading")
    arrived = state.get("status") == "done" and state.get("repo_id") == (model or "").strip()
    info = model_markdown(model or DEFAULT_MODEL) if arrived else gr.skip()
    return download_markdown(state), gr.Timer(active=running), info


def on_token_save(token: str | None) -> tuple[str, str]:
    """Check and store the token; the field is cleared either way (no token stays in the page)."""
    from studio.models.hub import HubError, save_token

    try:
        user = save_token(token or "")
    except HubError as exc:
        return "", f"❌ {exc}"
    return "", f"✅ Token stored for **{user}** where huggingface_hub keeps it."
