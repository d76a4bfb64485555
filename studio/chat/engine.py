"""Chat with a run: the base model and its fine-tune side by side, from ONE loaded model.

The base is loaded once through `studio.models.loader`, in the device's precision as training
loads it (bf16 on a GPU or on a CPU with native bf16; 4-bit for a QLoRA run unless 16-bit is
asked), with the run's LoRA adapter attached by peft. The fine-tuned side ("tuned") generates
with the adapter on; the base side ("base") from the very same weights with it off
(`model.disable_adapter()`, or per row when both sides share one batch:
`studio.models.batching.adapter_rows`), so there is never a second copy in memory. Prompts are
rendered with `studio.data.chat_format.render`, the one template path training used.

Also here: resolving a run, checkpoint or adapter folder; generating on a thread with a Stop
flag (the streamers are in `studio.chat.streaming`); unload. The guard that refuses to load
while a training run holds the GPU, and the hand-over to training, are in `studio.gpu`.
Scores, blind votes and batch compare are in `studio.chat.evaluate`; the load-time benchmark
is in `studio.tools.chat`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio import gpu, runs
from studio.chat.streaming import rows_streamer, stop_criteria, streamer_class
from studio.data import chat_format
from studio.models import loader as models
from studio.models.batching import (
    adapter_rows,
    batch_cost_problem,
    left_pad,
    mixed_batch_problem,
)
from studio.models.generate import stop_ids

SIDE_BASE = "base"
SIDE_TUNED = "tuned"
SIDES = (SIDE_BASE, SIDE_TUNED)
SIDE_LABELS = {SIDE_BASE: "base", SIDE_TUNED: "fine-tuned"}

PRECISION_AUTO = "as trained"
PRECISION_16 = "16-bit"
PRECISION_4 = "4-bit"
PRECISIONS = (PRECISION_AUTO, PRECISION_16, PRECISION_4)

Message = dict[str, str]


class ChatError(RuntimeError):
    """Something the user can fix: no model loaded, a bad adapter folder, a busy GPU..."""


# --------------------------------------------------------------------------- settings


@dataclass
class GenerationSettings:
    """One set of sampling settings, used for both sides so A and B are compared fairly."""

    temperature: float = 0.0  # 0 = greedy (deterministic)
    top_p: float = 1.0
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    seed: int = 42  # reset before each side, so sampled runs repeat
    min_new_tokens: int = 0  # hold the end token off this long (benchmarks fix the length)

    def validate(self) -> GenerationSettings:
        """Raise ChatError naming the first bad setting; return self when all is well."""
        checks = [
            (0.0 <= self.temperature <= 5.0, "temperature", "use 0 (greedy) to 5"),
            (0.0 < self.top_p <= 1.0, "top_p", "use a value above 0, at most 1"),
            (1 <= self.max_new_tokens <= 32768, "max_new_tokens", "use 1 to 32768"),
            (0.5 <= self.repetition_penalty <= 3.0, "repetition_penalty", "use 0.5 to 3 (1 = off)"),
            (0 <= self.seed < 2**32, "seed", "use 0 to 4294967295"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens", "use 0 to max"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ChatError(f"{name}: {msg}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def generate_kwargs(self, tokenizer: Any, stops: list[int] | None = None) -> dict[str, Any]:
        """Arguments for `model.generate` (all sampling knobs explicit: no hidden defaults);
        `stops`: the ids that end an answer (`studio.models.generate.stop_ids`)."""
        kw: dict[str, Any] = {
            "max_new_tokens": int(self.max_new_tokens),
            "repetition_penalty": float(self.repetition_penalty),
            "pad_token_id": tokenizer.pad_token_id,
        }
        if stops:
            kw["eos_token_id"] = list(stops)
        if self.min_new_tokens:
            kw["min_new_tokens"] = int(self.min_new_tokens)
        if self.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p))
            kw["top_k"] = 0  # only top-p is offered, so top-k must not cut silently
        return kw


# --------------------------------------------------------------------------- runs, adapters


@dataclass(frozen=True)
class ChatSource:
    """Which adapter Chat serves and the run it belongs to (None: a bare adapter folder).

    What the run says about itself (its base, method, template) is read by
    `studio.runs.open_run`, the one reader of a run folder; this only adds the choice of
    adapter (the final one or a checkpoint) and its label.
    """

    adapter_dir: Path
    run: runs.Run | None
    label: str

    @property
    def base_model(self) -> str | None:
        return self.run.base_model if self.run else runs.adapter_base(self.adapter_dir)

    @property
    def method(self) -> str:
        return self.run.method if self.run else "lora"

    @property
    def run_dir(self) -> Path | None:
        return self.run.path if self.run else None

    @property
    def out_dir(self) -> Path:
        """Where votes and comparisons go: the run folder, else the adapter folder."""
        return self.run_dir or self.adapter_dir


def resolve_adapter(path: str | Path) -> ChatSource:
    """Accept a run folder, one of its checkpoints, or any PEFT adapter folder."""
    raw = str(path or "").strip()
    if not raw:
        raise ChatError("Pick a run, a checkpoint or an adapter folder first.")
    p = Path(raw).expanduser()
    if not p.exists():
        raise ChatError(f"{p}: no such folder. Pick a run from the list or paste an adapter path.")
    if p.is_file():
        p = p.parent
    if runs.is_adapter_dir(p / runs.ADAPTER):
        adapter = p / runs.ADAPTER
    elif runs.is_adapter_dir(p):
        adapter = p
    else:
        ckpts = runs.adapter_checkpoints(p)
        if not ckpts:
            raise ChatError(
                f"{p}: no adapter here (no adapter_config.json, no adapter/ folder, no"
                " checkpoints). A run that is still starting has none yet."
            )
        adapter = ckpts[-1]
    adapter = adapter.resolve()
    run_dir = runs.find_run_dir(adapter)
    run = runs.open_run(run_dir) if run_dir else None
    if run is None:
        label = adapter.name
    elif adapter == run.adapter_dir:
        label = run.name
    else:
        label = f"{run.name}/{adapter.relative_to(run.path).as_posix()}"
    return ChatSource(adapter, run, label)


# --------------------------------------------------------------------------- engine


@dataclass
class LoadInfo:
    """What was loaded and how, for the status line; warnings are shown to the user.

    `adapter_dir` is "" when the base model is loaded alone (A only, no fine-tune yet);
    `reused_base` says the adapter was attached to the base already in memory.
    """

    label: str
    base_model: str
    base_path: str
    adapter_dir: str
    run_dir: str | None
    method: str
    precision: str  # "4-bit" or "16-bit"
    device: str
    dtype: str
    load_s: float
    tensor_bytes: int
    warnings: list[str] = field(default_factory=list)
    reused_base: bool = False

    @property
    def has_adapter(self) -> bool:
        return bool(self.adapter_dir)

    def summary(self) -> str:
        how = f"4-bit NF4 (compute {self.dtype})" if self.precision == "4-bit" else self.dtype
        size = f"{self.tensor_bytes / 1e6:.0f} MB of weights, {self.load_s:.1f} s"
        if not self.has_adapter:
            return (
                f"Loaded the base model {self.base_model} alone, in {how} on {self.device}"
                f" ({size}). A answers from it; B has no fine-tune loaded: pick a run and press"
                " Load, and its adapter is attached to this model without loading it again."
            )
        if self.reused_base:
            return (
                f"Loaded {self.label}: its adapter attached to the base {self.base_model} already"
                f" in memory (not loaded again), {how} on {self.device}; base side = adapter"
                f" disabled; {size}."
            )
        return (
            f"Loaded {self.label}: base {self.base_model} in {how} on {self.device}, adapter"
            f" attached once (base side = adapter disabled); {size}."
        )


@dataclass
class GenerationStats:
    """Timing of one side's answer (the Stop flag and bench use these)."""

    side: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float | None = None  # time to the first generated token
    total_s: float = 0.0
    stopped: bool = False
    hit_limit: bool = False  # cut at max_new_tokens, not ended by the model

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token (TTFT is reported apart)."""
        if self.new_tokens <= 1 or self.ttft_s is None or self.total_s <= self.ttft_s:
            return 0.0
        return (self.new_tokens - 1) / (self.total_s - self.ttft_s)


def _finish_stats(
    stats: GenerationStats,
    streamer: Any,
    started: float,
    stop_event: threading.Event,
    settings: GenerationSettings,
) -> GenerationStats:
    """Fill in one side's timing once its generation thread has ended."""
    stats.total_s = time.perf_counter() - started
    stats.new_tokens = streamer.new_tokens
    if streamer.first_token_at is not None:
        stats.ttft_s = streamer.first_token_at - started
    stats.stopped = stop_event.is_set()
    if not stats.stopped and streamer.new_tokens >= settings.max_new_tokens:
        stats.hit_limit = True
    return stats


def model_bytes(model: Any) -> int:
    """Bytes held by the model's parameters and buffers, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def wants_four_bit(method: str, precision: str) -> bool:
    """As trained (QLoRA runs were trained on a 4-bit base), unless 16/4-bit is asked."""
    return method == "qlora" if precision == PRECISION_AUTO else precision == PRECISION_4


def load_base(path: str | Path, four_bit: bool, device: str | None = None) -> Any:
    """The base model as training saw it, in the device's precision: 16-bit (bf16 or fp32 on
    a CPU) like `models.load_model_for_inference`, or NF4 double-quant 4-bit (bitsandbytes)
    like a QLoRA run."""
    device = gpu.default_device(device)
    if not four_bit:
        return models.load_model_for_inference(path, device)
    return models.load_model(path, device=device, four_bit=True).eval()


def resolve_base(name: str, source: ChatSource, progress: Any = None) -> models.ResolvedModel:
    """The base model to load: the run's own rule (`models.resolve_run_base`: the folder it
    trained on when the user kept its base), else the name resolved like everywhere else."""
    try:
        if source.run is not None:
            return models.resolve_run_base(source.run, name, progress)
        return models.resolve_model(name, progress)
    except models.ModelNotFoundError as exc:
        raise ChatError(str(exc)) from exc


def _load_warnings(
    source: ChatSource, base_model: str | None, name: str, base_path: Path, four_bit: bool
) -> list[str]:
    """What the user should know before trusting the answers: another base, or QLoRA in 16-bit."""
    warnings: list[str] = []
    if source.base_model and (base_model or "").strip() not in ("", source.base_model):
        trained_on = (source.run and source.run.base_model_path) or source.base_model
        if Path(trained_on).resolve() != base_path.resolve():
            warnings.append(
                f"This adapter was trained on {source.base_model}, not {name}: its answers"
                " may be garbage or loading may fail."
            )
    if source.method == "qlora" and not four_bit:
        warnings.append(
            "QLoRA run loaded in 16-bit: answers can differ slightly from the 4-bit base it"
            " was trained on (and use more memory)."
        )
    return warnings


@dataclass(frozen=True)
class BaseKey:
    """What makes two loads of a base the same model in memory: folder, 4-bit or not, device."""

    path: str  # the resolved folder
    four_bit: bool
    device: str


NO_TUNED = (
    "No fine-tune loaded: only the base model (A) is in memory. Pick a run and press Load to"
    " attach its adapter (the base is not loaded again)."
)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ChatError(f"precision: use one of {', '.join(PRECISIONS)}")


def _refuse_while_training() -> None:
    blocker = gpu.training_blocker()
    if blocker:
        raise ChatError(blocker)


def _has_lora_layers(model: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


class ChatEngine:
    """Holds one base model, with one adapter or none; both sides generate from it.

    The base can be loaded alone (A only, to see the baseline before any training); loading a
    run whose base is the same folder, precision and device attaches the adapter to the model
    already in memory, and swapping runs swaps adapters. Load, unload and a batch compare
    exclude each other: a load during a batch is refused, so a batch never loses its model.
    """

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.info: LoadInfo | None = None
        self.source: ChatSource | None = None
        self.last_stats: dict[str, GenerationStats] = {}
        self.base_loads = 0  # bases loaded from disk by this engine (attach reuses one)
        self.load_id = 0  # bumps on every load, attach and unload: tabs compare it
        self.unload_reason: str | None = None
        self._base: Any = None  # the plain transformers model under any adapter
        self._base_key: BaseKey | None = None
        self._lock = threading.RLock()  # one generate at a time: disable_adapter is global
        self._load_lock = threading.Lock()  # one load / attach / unload at a time
        self._busy: str | None = None  # the batch compare that holds the model
        self._stop_event = threading.Event()
        # Both sides in one generate call where PEFT allows it: None decides by the device
        # (`batch_cost_problem`), True batches wherever possible, False never does.
        self.batch_sides: bool | None = None
        self.last_mode = ""  # how the last turn ran: batched, or one by one and why
        gpu.hold(self)  # training unloads it before a GPU run (`gpu.release_for_training`)

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def has_adapter(self) -> bool:
        return self.model is not None and self.source is not None

    def current(self) -> dict[str, Any] | None:
        """What is loaded now, as plain data a tab keeps to notice that another tab changed it."""
        info, source = self.info, self.source
        if self.model is None or info is None:
            return None
        return {
            "id": self.load_id,
            "label": info.label,
            "base_model": info.base_model,
            "has_adapter": source is not None,
            "out_dir": str(source.out_dir) if source is not None else None,
        }

    # ---- load / unload

    @contextlib.contextmanager
    def _exclusive(self, action: str) -> Iterator[None]:
        """Hold the load lock for `action`; refuse while a batch compare holds the model."""
        with self._load_lock:
            if self._busy:
                raise ChatError(
                    f"A batch compare is running on {self._busy}: to {action} now would unload"
                    " its model mid-batch. Stop the batch (or wait for it to end), then try again."
                )
            yield

    @contextlib.contextmanager
    def hold_for_batch(self, expect_id: int | None = None) -> Iterator[dict[str, Any]]:
        """Keep the loaded run for a batch compare: loads and unloads are refused meanwhile.

        Yields `current()` as the batch started (its run is where the CSV goes). `expect_id`:
        refuse when the model is no longer the one the caller picked its prompts for.
        """
        if not self._load_lock.acquire(blocking=False):
            raise ChatError("A model is being loaded: wait for it, then run the batch.")
        try:
            now = self.current()
            if self._busy:
                raise ChatError(f"A batch compare is already running on {self._busy}.")
            if now is None or not now["has_adapter"]:
                raise ChatError(
                    "Batch compare needs a fine-tune: pick a run and press Load."
                    if now
                    else "No model loaded: pick a run and press Load."
                )
            if expect_id is not None and now["id"] != expect_id:
                raise ChatError(f"The Chat model changed: {now['label']} is loaded now.")
            self._busy = now["label"]
        finally:
            self._load_lock.release()
        try:
            yield now
        finally:
            self._busy = None

    def load(
        self,
        adapter: str | Path,
        base_model: str | None = None,
        precision: str = PRECISION_AUTO,
        device: str | None = None,
        progress: Callable[[str, float], None] | None = None,
    ) -> LoadInfo:
        """Load a run: its base (resolved like training did) with its adapter attached.

        When the base in memory is the same folder, precision and device, the adapter is
        attached to it (swapping any earlier one) and the base is not loaded again; else
        whatever was loaded is replaced. Raises ChatError with what to do.
        """
        from studio import heavy

        heavy.ready()  # one thread imports torch/transformers at a time
        progress = progress or (lambda _m, _f: None)
        _check_precision(precision)
        _refuse_while_training()
        source = resolve_adapter(adapter)
        name = (base_model or "").strip() or source.base_model
        if not name:
            raise ChatError(
                f"{source.label}: the run does not say which base model it was trained on;"
                " pick the base model."
            )
        resolved = resolve_base(name, source, progress)
        key = BaseKey(
            str(Path(resolved.path).resolve()),
            wants_four_bit(source.method, precision),
            gpu.default_device(device),
        )
        warnings = _load_warnings(source, base_model, name, Path(resolved.path), key.four_bit)
        with self._exclusive("load another model"):
            started = time.perf_counter()
            reused = self._base is not None and self._base_key == key
            if not reused:
                self._load_fresh_base(key, name, progress)
            tok = self._tokenizer_for(resolved.path, source, warnings)
            progress("Attaching the adapter", 0.8)
            model = self._attach(source, name)
            info = self._info(source.label, name, key, model, started, source, warnings)
            info.reused_base = reused
            self._publish(model, tok, source, info)
        progress("Ready", 1.0)
        return info

    def load_base_only(
        self,
        base_model: str | None = None,
        precision: str = PRECISION_AUTO,
        device: str | None = None,
        progress: Callable[[str, float], None] | None = None,
    ) -> LoadInfo:
        """Load a base model alone (A only): the baseline a user sees before any training.

        `base_model`: a name resolved by `studio.models.loader` (blank: the default model).
        "As trained" means 16-bit here (there is no run). An adapter already on this very
        base is detached instead of loading the base again.
        """
        from studio import heavy

        heavy.ready()  # one thread imports torch/transformers at a time
        progress = progress or (lambda _m, _f: None)
        _check_precision(precision)
        _refuse_while_training()
        name = (base_model or "").strip() or models.DEFAULT_MODEL
        try:
            resolved = models.resolve_model(name, progress)
        except models.ModelNotFoundError as exc:
            raise ChatError(str(exc)) from exc
        key = BaseKey(
            str(Path(resolved.path).resolve()), precision == PRECISION_4, gpu.default_device(device)
        )
        with self._exclusive("load another model"):
            started = time.perf_counter()
            reused = self._base is not None and self._base_key == key
            if not reused:
                self._load_fresh_base(key, name, progress)
            tok = models.load_tokenizer(resolved.path)
            base = self._detach()
            info = self._info(name, name, key, base, started, None, [])
            info.reused_base = reused
            self._publish(base, tok, None, info)
        progress("Ready", 1.0)
        return info

    def _load_fresh_base(
        self, key: BaseKey, name: str, progress: Callable[[str, float], None]
    ) -> None:
        """Free whatever is loaded, then load the base as `key` says (the slow part)."""
        from studio.train.memory import gpu_blocker

        if str(key.device).startswith("cuda") and gpu_blocker():  # a fatal CUDA error
            raise ChatError(gpu_blocker() or "")
        self._drop("replaced by another model")
        progress(f"Loading {name} ({'4-bit' if key.four_bit else '16-bit'})", 0.2)
        try:
            base = load_base(key.path, key.four_bit, key.device)
        except ImportError as exc:
            raise ChatError(f"4-bit loading needs bitsandbytes: {exc}") from exc
        self.base_loads += 1
        blocker = gpu.training_blocker()  # training may have started while this loaded
        if blocker:
            del base
            gpu.free_memory()
            raise ChatError(blocker)
        with self._lock:
            self._base, self._base_key = base, key

    def _detach(self) -> Any:
        """The plain base with any adapter taken off (not merged); waits for a generation."""
        from peft import PeftModel

        self.stop()
        with self._lock:
            if isinstance(self.model, PeftModel):
                self._base = self.model.unload()
                self.model, self.source = self._base, None
            return self._base

    def _attach(self, source: ChatSource, name: str) -> Any:
        """The base in memory with the run's adapter attached by peft, in eval mode.

        When the adapter does not fit, the clean base stays loaded alone (A only); a base
        that peft left half-modified is unloaded. Raises ChatError saying which happened.
        """
        from peft import PeftModel

        base = self._detach()
        with self._lock:
            try:
                model = PeftModel.from_pretrained(base, str(source.adapter_dir), is_trainable=False)
            except Exception as exc:
                if _has_lora_layers(base):
                    self._drop(f"the adapter of {source.label} did not fit")
                    kept = "The base model was unloaded."
                else:
                    info = self._info(
                        name, name, self._base_key, base, time.perf_counter(), None, []
                    )
                    self._publish(base, models.load_tokenizer(self._base_key.path), None, info)
                    kept = "The base model stays loaded alone (A only)."
                raise ChatError(
                    f"The adapter in {source.adapter_dir} does not fit {name}: {exc}. Pick the"
                    f" base model the run was trained on. {kept}"
                ) from exc
        return model.eval()

    def _info(
        self,
        label: str,
        name: str,
        key: BaseKey | None,
        model: Any,
        started: float,
        source: ChatSource | None,
        warnings: list[str],
    ) -> LoadInfo:
        key = key or BaseKey("", False, "cpu")
        return LoadInfo(
            label=label,
            base_model=name,
            base_path=key.path,
            adapter_dir=str(source.adapter_dir) if source else "",
            run_dir=str(source.run_dir) if source and source.run_dir else None,
            method=source.method if source else "",
            precision="4-bit" if key.four_bit else "16-bit",
            device=key.device,
            dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
            load_s=time.perf_counter() - started,
            tensor_bytes=model_bytes(model),
            warnings=warnings,
        )

    def _publish(self, model: Any, tok: Any, source: ChatSource | None, info: LoadInfo) -> None:
        with self._lock:
            self.model, self.tokenizer, self.source, self.info = model, tok, source, info
            self.last_stats = {}
            self.load_id += 1
            self.unload_reason = None

    def _drop(self, reason: str | None) -> None:
        """Forget the model (after the generation in progress halts) and free its memory."""
        self.stop()
        with self._lock:
            had = self.model is not None or self._base is not None
            self.model = self.tokenizer = self.info = self.source = None
            self._base, self._base_key = None, None
            if had:
                self.load_id += 1
                self.unload_reason = reason
        gpu.free_memory()

    def unload(self, reason: str | None = None) -> None:
        """Drop the model and give its memory back (RAM, and VRAM on a GPU).

        Refused (ChatError) while a batch compare holds the model.
        """
        with self._exclusive("unload"):
            self._drop(reason)

    def release(self, reason: str) -> str | None:
        """Unload even during a batch compare (it stops, saving its finished rows); returns
        the label of what was loaded, or None when nothing was. Training uses this."""
        with self._load_lock:
            label = self.info.label if self.info else None
            if self.model is None and self._base is None:
                return None
            self._drop(reason)
            return label or "base model"

    def _tokenizer_for(self, base_path: Path, source: ChatSource, warnings: list[str]) -> Any:
        """The run's tokenizer (`models.load_run_tokenizer`: the copy saved with the adapter,
        as the export uses); a warning when its template is not the one training recorded."""
        run = source.run
        tok = models.load_run_tokenizer(source.adapter_dir, base_path, run and run.chat_template)
        want = run.template_hash if run else None
        have = chat_format.template_hash(tok)
        if want and have != want:
            warnings.append(
                f"Chat template mismatch: the run was trained with template {want}, this"
                f" tokenizer has {have}. Answers may be off; pick the base model the run was"
                " trained on."
            )
        return tok

    def tensor_bytes(self) -> int:
        """Bytes of weights held (each storage once): base + adapter, never two bases."""
        return model_bytes(self.model) if self.model is not None else 0

    # ---- generation

    def stop(self) -> None:
        """Halt the generation in progress at the next token (and the rest of its turn)."""
        self._stop_event.set()

    @property
    def stopped(self) -> bool:
        return self._stop_event.is_set()

    def begin_turn(self) -> None:
        """Check that a model is loaded and clear an earlier Stop (a batch is one long turn)."""
        self._require()
        self._stop_event.clear()

    def _require(self) -> tuple[Any, Any]:
        model, tok = self.model, self.tokenizer
        if model is None or tok is None:
            raise ChatError(
                "No model loaded: pick a run and press Load (or load the base model alone)."
            )
        return model, tok

    def prompt_text(self, messages: list[Message], system: str | None = None) -> str:
        """The exact text the model sees: the training template plus the assistant header."""
        _, tok = self._require()
        return chat_format.render(tok, with_system(messages, system), add_generation_prompt=True)

    def stream(
        self,
        side: str,
        messages: list[Message],
        settings: GenerationSettings | None = None,
        *,
        system: str | None = None,
        new_turn: bool = True,
    ) -> Iterator[str]:
        """Yield the answer of one side in pieces as they are generated.

        `new_turn=False` keeps a Stop pressed earlier in the same turn in force (compare).
        """
        if side not in SIDES:
            raise ChatError(f"side: use one of {', '.join(SIDES)}")
        settings = (settings or GenerationSettings()).validate()
        with self._lock:  # a consistent view: the model, whether it has an adapter, its id
            model, tok = self._require()
            tuned, load_id = self.source is not None, self.load_id
        if side == SIDE_TUNED and not tuned:
            raise ChatError(NO_TUNED)
        if new_turn:
            self._stop_event.clear()
        text = self.prompt_text(messages, system)
        enc = tok(text, add_special_tokens=False, return_tensors="pt").to(model.device)
        streamer = streamer_class()(tok)
        stats = GenerationStats(side, prompt_tokens=int(enc["input_ids"].shape[1]))
        errors: list[BaseException] = []
        stop_event = self._stop_event
        kwargs = dict(
            **enc,
            streamer=streamer,
            stopping_criteria=stop_criteria(stop_event),
            **settings.generate_kwargs(tok, stop_ids(tok, model)),
        )
        started = time.perf_counter()
        streamer.started = started
        switch = model.disable_adapter if side == SIDE_BASE and tuned else None
        args = (load_id, model, switch, settings.seed, kwargs, errors)
        try:
            yield from self._read_while_generating(f"chat-{side}", args, streamer)
        finally:
            self.last_stats[side] = _finish_stats(stats, streamer, started, stop_event, settings)
        _raise_first(errors, f"on the {SIDE_LABELS[side]} side")

    def _read_while_generating(
        self, name: str, args: tuple[Any, ...], chunks: Iterator[Any]
    ) -> Iterator[Any]:
        """Run `generate` on a thread and yield its streamer's non-empty pieces; a reader that
        goes away presses Stop, so the thread never generates for nobody."""
        run = self._generate_on_thread
        thread = threading.Thread(target=run, args=args, name=name, daemon=True)
        thread.start()
        read_all = False
        try:
            for chunk in chunks:
                if chunk:
                    yield chunk
            read_all = True
        finally:
            if not read_all:
                self._stop_event.set()
            thread.join()

    def _generate_on_thread(
        self,
        load_id: int,
        model: Any,
        switch: Callable[[], Any] | None,
        seed: int,
        kwargs: dict[str, Any],
        errors: list[BaseException],
    ) -> None:
        """Run `generate` under the lock (the adapter switch is the model's own state); any
        error is kept for the reader and ends the stream, so the reader never waits forever.

        `switch`: a context manager factory that turns the adapter off for a base side
        (`disable_adapter`) or per row for a batch (`adapter_rows`, which yields extra
        `generate` arguments); None where there is nothing to switch."""
        import torch

        with self._lock:
            try:
                if self.load_id != load_id:
                    why = self.unload_reason or "another model was loaded"
                    raise ChatError(f"The model changed before this answer started: {why}.")
                torch.manual_seed(seed)
                with (switch or contextlib.nullcontext)() as extra, torch.inference_mode():
                    model.generate(**kwargs, **(extra or {}))
            except BaseException as exc:
                errors.append(exc)
                kwargs["streamer"].end()

    def stream_rows(
        self,
        rows: list[tuple[str, list[Message], str | None]],
        settings: GenerationSettings | None = None,
        *,
        new_turn: bool = True,
    ) -> Iterator[tuple[int, str]]:
        """Answer several (side, messages, system) rows; yield (row index, chunk) as they come.

        With an adapter loaded, all rows go through ONE `generate` call: a left-padded batch
        whose base rows run with the adapter off and fine-tuned rows with it on
        (`studio.models.batching.adapter_rows`: per-row LoRA scaling, else PEFT's mixed adapter
        batches), so one model and one adapter serve both at once and a turn costs about one
        answer's time, not two. Where the rows cannot share a batch
        (`mixed_batch_problem`), or where one pass would be slower on this device
        (`batch_cost_problem`), or `batch_sides` is off, the rows run one after the other;
        `last_mode` says which happened and why, for the stats line. Greedy answers are the
        same either way; a sampled turn is batched too (one seed per turn, both sides share
        one settings), so it repeats under its seed but draws differently from a side alone.
        """
        settings = (settings or GenerationSettings()).validate()
        with self._lock:
            model, tok = self._require()
            tuned, load_id = self.source is not None, self.load_id
        if new_turn:
            self._stop_event.clear()
        texts = [self.prompt_text(m, s) for _, m, s in rows]
        enc = left_pad(tok, texts, model.device) if tuned and len(rows) > 1 else None
        problem = None
        if enc is not None:
            problem = mixed_batch_problem(model, settings.repetition_penalty, enc["lengths"])
            problem = problem or self._batching_off(model, len(rows))
        if enc is None or problem:
            self.last_mode = _sequential_mode(len(rows), problem)
            yield from self._rows_one_by_one(rows, settings)
            return
        self.last_mode = f"{len(rows)} answers in one batched pass"
        if len(rows) == 2 and {r[0] for r in rows} == set(SIDES):
            self.last_mode = "A and B in one batched pass"
        yield from self._rows_batched(rows, settings, model, tok, enc, load_id)

    def _batching_off(self, model: Any, n_rows: int) -> str | None:
        """Why this turn runs one row after the other though it could batch, or None."""
        if self.batch_sides is None:
            return batch_cost_problem(model, n_rows)
        return None if self.batch_sides else "batching is turned off"

    def _rows_one_by_one(
        self, rows: list[tuple[str, list[Message], str | None]], settings: GenerationSettings
    ) -> Iterator[tuple[int, str]]:
        """The fallback: each row alone, in order; a Stop skips the rows not started."""
        for i, (side, messages, system) in enumerate(rows):
            if self._stop_event.is_set():
                break
            for chunk in self.stream(side, messages, settings, system=system, new_turn=False):
                yield i, chunk

    def _rows_batched(
        self,
        rows: list[tuple[str, list[Message], str | None]],
        settings: GenerationSettings,
        model: Any,
        tok: Any,
        enc: dict[str, Any],
        load_id: int,
    ) -> Iterator[tuple[int, str]]:
        """All rows in one `generate` on a thread; each row streams and ends on its own."""
        lengths = enc.pop("lengths")
        stops = stop_ids(tok, model)
        streamer = rows_streamer(tok, len(rows), set(stops))
        stop_event, errors = self._stop_event, []
        kwargs = dict(
            **enc,
            streamer=streamer,
            stopping_criteria=stop_criteria(stop_event),
            **settings.generate_kwargs(tok, stops),
        )
        tuned = [r[0] != SIDE_BASE for r in rows]
        switch = functools.partial(adapter_rows, model, tuned, stops)
        args = (load_id, model, switch, settings.seed, kwargs, errors)
        started = time.perf_counter()
        try:
            yield from self._read_while_generating("chat-batch", args, streamer)
        finally:
            for i, (side, _, _) in enumerate(rows):
                stats = _finish_stats(
                    GenerationStats(side, prompt_tokens=lengths[i]),
                    streamer.rows[i],
                    started,
                    stop_event,
                    settings,
                )
                stats.total_s = (streamer.ended_at[i] or time.perf_counter()) - started
                stats.stopped = stats.stopped and not streamer.by_end_token[i]
                self.last_stats[side] = stats
        _raise_first(errors, "(both sides in one batch)")

    def generate_rows(
        self,
        rows: list[tuple[str, list[Message], str | None]],
        settings: GenerationSettings | None = None,
        *,
        new_turn: bool = True,
    ) -> list[str]:
        """The whole answers of `stream_rows` (batch compare uses this)."""
        out = [""] * len(rows)
        for i, chunk in self.stream_rows(rows, settings, new_turn=new_turn):
            out[i] += chunk
        return out

    def generate(
        self,
        side: str,
        messages: list[Message],
        settings: GenerationSettings | None = None,
        *,
        system: str | None = None,
        new_turn: bool = True,
    ) -> str:
        """The whole answer of one side (batch compare and tests use this)."""
        return "".join(self.stream(side, messages, settings, system=system, new_turn=new_turn))

    def compare_stream(
        self,
        histories: dict[str, list[Message]],
        settings: GenerationSettings | None = None,
        *,
        system: str | None = None,
        order: tuple[str, ...] = SIDES,
    ) -> Iterator[tuple[str, str]]:
        """One turn on both sides: yield (side, chunk) as each side's text comes.

        Both sides are generated together in one batched pass where PEFT allows it
        (`stream_rows`), so their chunks interleave; else one after the other in `order`
        (`last_mode` says why). Each side gets its own history (they diverge after the first
        answer). A Stop halts what is generating and skips a side that has not started. With
        a base loaded alone, ask for `order=(SIDE_BASE,)`: the fine-tuned side raises NO_TUNED.
        """
        if SIDE_TUNED in order and self.loaded and not self.has_adapter:
            raise ChatError(NO_TUNED)
        rows = [(side, histories[side], system) for side in order]
        for i, chunk in self.stream_rows(rows, settings, new_turn=True):
            yield order[i], chunk


def _raise_first(errors: list[BaseException], where: str) -> None:
    """Raise the generate thread's first error as a ChatError (as it is, if it was one)."""
    if not errors:
        return
    if isinstance(errors[0], ChatError):
        raise errors[0]
    raise ChatError(f"Generation failed {where}: {errors[0]}") from errors[0]


def _sequential_mode(n_rows: int, problem: str | None) -> str:
    """The stats line's note for rows answered one after the other."""
    if n_rows <= 1:
        return ""
    return f"one side after the other ({problem})" if problem else "one side after the other"


def with_system(messages: list[Message], system: str | None) -> list[Message]:
    """Put the system prompt first (replacing one already there); blank means none."""
    system = (system or "").strip()
    rest = [dict(m) for m in messages]
    if not system:
        return rest
    if rest and rest[0].get("role") == "system":
        rest = rest[1:]
    return [{"role": "system", "content": system}, *rest]
