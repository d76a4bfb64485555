"""Chat with a run: the base model and its fine-tune side by side, from ONE loaded model.

The base is loaded once through `studio.models.loader` (in 4-bit for a QLoRA run, as it was
trained, unless 16-bit is asked) with the run's LoRA adapter attached by peft. The fine-tuned
side ("tuned") generates with the adapter on; the base side ("base") generates from the very
same weights inside `model.disable_adapter()`, so there is never a second copy in memory.
Prompts are rendered with `studio.data.chat_format.render`, the one template path training used.

Also here: resolving a run, checkpoint or adapter folder; streaming (`TextIteratorStreamer` +
`generate` on a thread) with a Stop flag; unload; and the guard that refuses to load while a
training run holds the GPU. Scores, blind votes and batch compare are in
`studio.chat.evaluate`; the load-time benchmark is in `studio.chat.measure`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.data import chat_format
from studio.models import loader as models
from studio.runs import read_json

SIDE_BASE = "base"
SIDE_TUNED = "tuned"
SIDES = (SIDE_BASE, SIDE_TUNED)
SIDE_LABELS = {SIDE_BASE: "base", SIDE_TUNED: "fine-tuned"}

PRECISION_AUTO = "as trained"
PRECISION_16 = "16-bit"
PRECISION_4 = "4-bit"
PRECISIONS = (PRECISION_AUTO, PRECISION_16, PRECISION_4)

METADATA_FILE = "training_metadata.json"
ADAPTER_CONFIG = "adapter_config.json"

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

    def validate(self) -> GenerationSettings:
        """Raise ChatError naming the first bad setting; return self when all is well."""
        checks = [
            (0.0 <= self.temperature <= 5.0, "temperature", "use 0 (greedy) to 5"),
            (0.0 < self.top_p <= 1.0, "top_p", "use a value above 0, at most 1"),
            (1 <= self.max_new_tokens <= 32768, "max_new_tokens", "use 1 to 32768"),
            (0.5 <= self.repetition_penalty <= 3.0, "repetition_penalty", "use 0.5 to 3 (1 = off)"),
            (0 <= self.seed < 2**32, "seed", "use 0 to 4294967295"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ChatError(f"{name}: {msg}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def generate_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        """Arguments for `model.generate` (all sampling knobs explicit: no hidden defaults)."""
        kw: dict[str, Any] = {
            "max_new_tokens": int(self.max_new_tokens),
            "repetition_penalty": float(self.repetition_penalty),
            "pad_token_id": tokenizer.pad_token_id,
        }
        if self.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p))
            kw["top_k"] = 0  # only top-p is offered, so top-k must not cut silently
        return kw


# --------------------------------------------------------------------------- runs, adapters


@dataclass
class AdapterSource:
    """Where an adapter lives and what its run says about how it was trained."""

    adapter_dir: Path
    run_dir: Path | None  # None: a bare adapter folder outside any run
    metadata: dict[str, Any]
    label: str

    @property
    def base_model(self) -> str | None:
        base = self.metadata.get("base_model")
        if isinstance(base, dict):
            base = base.get("name")
        return str(base) if base else self._adapter_base()

    @property
    def base_model_path(self) -> str | None:
        base = self.metadata.get("base_model")
        if isinstance(base, dict) and base.get("path"):
            return str(base["path"])
        return self.metadata.get("base_model_path")

    @property
    def method(self) -> str:
        settings = self.metadata.get("settings") or {}
        return str(settings.get("method") or self.metadata.get("method") or "lora")

    @property
    def template_hash(self) -> str | None:
        return self.metadata.get("template_hash")

    @property
    def out_dir(self) -> Path:
        """Where votes and comparisons go: the run folder, else the adapter folder."""
        return self.run_dir or self.adapter_dir

    def _adapter_base(self) -> str | None:
        try:
            cfg = json.loads((self.adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return cfg.get("base_model_name_or_path")


@dataclass
class ChatRun:
    """A run that has an adapter to chat with (for the run picker)."""

    path: Path
    name: str
    status: str
    base_model: str
    method: str

    @property
    def label(self) -> str:
        return f"{self.name} · {self.method} · {self.status}"


def _is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Intermediate adapters saved during a run, oldest first (complete ones only)."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    from studio import runs as runs_mod  # knows where checkpoints go and which are complete

    return [p for p in runs_mod.checkpoints(run) if _is_adapter_dir(p)]


def list_chat_runs() -> list[ChatRun]:
    """Runs that have an adapter (final or a checkpoint) to chat with, newest first."""
    from studio import runs as runs_mod

    out: list[ChatRun] = []
    for info in runs_mod.list_runs():
        path = Path(info.path)
        if _is_adapter_dir(path / "adapter") or list_checkpoints(path):
            out.append(
                ChatRun(path, info.name, info.status, info.base_model, info.method or "lora")
            )
    return out


def resolve_adapter(path: str | Path) -> AdapterSource:
    """Accept a run folder, one of its checkpoints, or any PEFT adapter folder."""
    raw = str(path or "").strip()
    if not raw:
        raise ChatError("Pick a run, a checkpoint or an adapter folder first.")
    p = Path(raw).expanduser()
    if not p.exists():
        raise ChatError(f"{p}: no such folder. Pick a run from the list or paste an adapter path.")
    if p.is_file():
        p = p.parent
    if _is_adapter_dir(p / "adapter"):
        adapter = p / "adapter"
    elif _is_adapter_dir(p):
        adapter = p
    else:
        ckpts = list_checkpoints(p)
        if not ckpts:
            raise ChatError(
                f"{p}: no adapter here (no adapter_config.json, no adapter/ folder, no"
                " checkpoints). A run that is still starting has none yet."
            )
        adapter = ckpts[-1]
    run_dir = None
    for parent in [adapter, *list(adapter.parents)[:3]]:
        if (parent / METADATA_FILE).is_file():
            run_dir = parent
            break
    meta = read_json(run_dir / METADATA_FILE) if run_dir else {}
    if run_dir is None:
        label = adapter.name
    elif adapter == run_dir / "adapter":
        label = run_dir.name
    else:
        label = f"{run_dir.name}/{adapter.relative_to(run_dir).as_posix()}"
    return AdapterSource(adapter.resolve(), run_dir.resolve() if run_dir else None, meta, label)


# --------------------------------------------------------------------------- engine


@dataclass
class LoadInfo:
    """What was loaded and how, for the status line; warnings are shown to the user."""

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

    def summary(self) -> str:
        how = f"4-bit NF4 (compute {self.dtype})" if self.precision == "4-bit" else self.dtype
        return (
            f"Loaded {self.label}: base {self.base_model} in {how} on {self.device}, adapter"
            f" attached once (base side = adapter disabled); {self.tensor_bytes / 1e6:.0f} MB of"
            f" weights, {self.load_s:.1f} s."
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


def _streamer_class():
    """TextIteratorStreamer that also flushes Thai/Lao/Khmer/Myanmar/Japanese text eagerly.

    The stock streamer only releases text at spaces (or CJK ideographs), so a Thai answer,
    written without spaces, would arrive all at once at the end. It also records when the
    first generated token came and how many there were.
    """
    from transformers import TextIteratorStreamer

    class _Streamer(TextIteratorStreamer):
        def __init__(self, tokenizer: Any, **kw: Any) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kw)
            self.started = time.perf_counter()
            self.first_token_at: float | None = None
            self.new_tokens = 0

        def put(self, value: Any) -> None:
            if not self.next_tokens_are_prompt:
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.new_tokens += int(value.numel())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if stream_end:  # cut by max_new_tokens inside a multi-byte character
                text = text.rstrip("\ufffd")
            super().on_finalized_text(text, stream_end)

        def _is_chinese_char(self, cp: int) -> bool:
            no_space_scripts = (
                (0x0E00, 0x0EFF),  # Thai, Lao
                (0x1000, 0x109F),  # Myanmar
                (0x1780, 0x17FF),  # Khmer
                (0x3040, 0x30FF),  # Hiragana, Katakana
            )
            return super()._is_chinese_char(cp) or any(a <= cp <= b for a, b in no_space_scripts)

    return _Streamer


def _stop_criteria(event: threading.Event):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopFlag(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full(
                (input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return StoppingCriteriaList([_StopFlag()])


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


def training_blocker() -> str | None:
    """A message when a training run is active on a GPU (chat would compete for its VRAM).

    On CPU, chatting during training is allowed (slow, but harmless). Runs trained by any
    process count: a run folder whose training process is alive (`studio.runs`), plus the
    Train tab's job registry (`studio.train.jobs`) when it exists.
    """
    for active in (_active_job_from_jobs, _active_run_on_disk):
        try:
            found = active()
        except Exception:
            found = None
        if found:
            name, device = found
            if device.startswith("cuda") or device == "gpu":
                return (
                    f"Training ({name}) is using the GPU right now. Chatting would compete for"
                    " its memory and could crash it with out-of-memory: wait for it to finish"
                    " or stop it in the Train tab, then load the chat model."
                )
    return None


def _active_job_from_jobs() -> tuple[str, str] | None:
    """The Train tab's job in this process (`studio.train.jobs`), as (name, device)."""
    try:
        from studio.train import jobs
    except ImportError:
        return None
    run_dir = jobs.get_manager().active_run_dir()
    if run_dir is None:
        return None
    device = (read_json(run_dir / METADATA_FILE).get("device") or {}).get("used") or ""
    if not device:  # metadata not written yet: the run will use the GPU if there is one
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return run_dir.name, str(device).lower()


def _active_run_on_disk() -> tuple[str, str] | None:
    """A run folder some live process is training (CLI or app), as (name, device)."""
    from studio import runs as runs_mod

    found = None
    for info in runs_mod.list_runs():
        if info.status == "running":
            meta = runs_mod.read_metadata(info.path)
            device = str((meta.get("device") or {}).get("used") or "").lower()
            if device.startswith("cuda"):
                return info.name, device
            found = found or (info.name, device)
    return found


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
    """The base model as training saw it: 16-bit like `models.load_model_for_inference`,
    or NF4 double-quant 4-bit (bitsandbytes) like a QLoRA run."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not four_bit:
        return models.load_model_for_inference(path, device)
    dtype = None if device.startswith("cuda") else torch.float32
    return models.load_model(path, device=device, dtype=dtype, four_bit=True).eval()


def resolve_base(name: str, source: AdapterSource, progress: Any = None) -> models.ResolvedModel:
    """The base model to load: the exact folder the run trained on when the user kept the
    run's base, else the name resolved like everywhere else (local, cache or embedded)."""
    saved = source.base_model_path
    if saved and name == source.base_model and models.is_model_dir(Path(saved)):
        return models.ResolvedModel(name, Path(saved), "local")
    try:
        return models.resolve_model(name, progress)
    except models.ModelNotFoundError as exc:
        raise ChatError(str(exc)) from exc


def _load_warnings(
    source: AdapterSource, base_model: str | None, name: str, base_path: Path, four_bit: bool
) -> list[str]:
    """What the user should know before trusting the answers: another base, or QLoRA in 16-bit."""
    warnings: list[str] = []
    if source.base_model and (base_model or "").strip() not in ("", source.base_model):
        trained_on = source.base_model_path or source.base_model
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


class ChatEngine:
    """Holds one base model with one adapter; both sides generate from it, one at a time."""

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.info: LoadInfo | None = None
        self.source: AdapterSource | None = None
        self.last_stats: dict[str, GenerationStats] = {}
        self._lock = threading.RLock()  # one generate at a time: disable_adapter is global
        self._stop_event = threading.Event()

    @property
    def loaded(self) -> bool:
        return self.model is not None

    # ---- load / unload

    def load(
        self,
        adapter: str | Path,
        base_model: str | None = None,
        precision: str = PRECISION_AUTO,
        device: str | None = None,
        progress: Callable[[str, float], None] | None = None,
    ) -> LoadInfo:
        """Load the base (resolved like training did) and attach the adapter to it.

        Replaces whatever was loaded before. Raises ChatError with what to do.
        """
        import torch

        progress = progress or (lambda _m, _f: None)
        if precision not in PRECISIONS:
            raise ChatError(f"precision: use one of {', '.join(PRECISIONS)}")
        blocker = training_blocker()
        if blocker:
            raise ChatError(blocker)
        source = resolve_adapter(adapter)
        name = (base_model or "").strip() or source.base_model
        if not name:
            raise ChatError(
                f"{source.label}: the run does not say which base model it was trained on;"
                " pick the base model."
            )
        resolved = resolve_base(name, source, progress)
        four_bit = wants_four_bit(source.method, precision)
        warnings = _load_warnings(source, base_model, name, Path(resolved.path), four_bit)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.unload()
        started = time.perf_counter()
        tok = self._tokenizer_for(resolved.path, source, warnings)
        progress(f"Loading {name} ({'4-bit' if four_bit else '16-bit'})", 0.2)
        model = self._load_with_adapter(resolved.path, four_bit, device, source, name, progress)
        dtype = next(model.parameters()).dtype
        info = LoadInfo(
            label=source.label,
            base_model=name,
            base_path=str(resolved.path),
            adapter_dir=str(source.adapter_dir),
            run_dir=str(source.run_dir) if source.run_dir else None,
            method=source.method,
            precision="4-bit" if four_bit else "16-bit",
            device=device,
            dtype=str(dtype).replace("torch.", ""),
            load_s=time.perf_counter() - started,
            tensor_bytes=model_bytes(model),
            warnings=warnings,
        )
        with self._lock:
            self.model, self.tokenizer, self.source, self.info = model, tok, source, info
            self.last_stats = {}
        progress("Ready", 1.0)
        return info

    def _load_with_adapter(
        self,
        base_path: Path,
        four_bit: bool,
        device: str,
        source: AdapterSource,
        name: str,
        progress: Callable[[str, float], None],
    ) -> Any:
        """The base with the run's adapter attached by peft, in eval mode.

        Raises ChatError when the adapter does not fit; the base's memory is freed first
        (this frame holds the only reference to it).
        """
        from peft import PeftModel

        try:
            base = load_base(base_path, four_bit, device)
        except ImportError as exc:
            raise ChatError(f"4-bit loading needs bitsandbytes: {exc}") from exc
        progress("Attaching the adapter", 0.8)
        try:
            model = PeftModel.from_pretrained(base, str(source.adapter_dir), is_trainable=False)
        except Exception as exc:
            del base
            self._free()
            raise ChatError(
                f"The adapter in {source.adapter_dir} does not fit {name}: {exc}. Pick the base"
                " model the run was trained on."
            ) from exc
        model.eval()
        return model

    def _tokenizer_for(self, base_path: Path, source: AdapterSource, warnings: list[str]) -> Any:
        """The base model's tokenizer; the run's copy when only that one matches training."""
        tok = models.load_tokenizer(base_path)
        want = source.template_hash
        if not want:
            return tok
        have = chat_format.template_hash(tok)
        if have == want:
            return tok
        saved = None
        if (source.adapter_dir / "tokenizer_config.json").is_file():
            with contextlib.suppress(Exception):
                saved = models.load_tokenizer(source.adapter_dir)
        if saved is not None and chat_format.template_hash(saved) == want:
            warnings.append(
                "The base model's chat template differs from the one this run was trained with;"
                " using the run's saved template so prompts match training."
            )
            return saved
        warnings.append(
            f"Chat template mismatch: the run was trained with template {want}, this base has"
            f" {have}. Answers may be off; pick the base model the run was trained on."
        )
        return tok

    def unload(self) -> None:
        """Drop the model and give its memory back (RAM, and VRAM on a GPU)."""
        self.stop()
        with self._lock:
            self.model = None
            self.tokenizer = None
            self.info = None
            self.source = None
        self._free()

    @staticmethod
    def _free() -> None:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass

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
            raise ChatError("No model loaded: pick a run and press Load.")
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
        model, tok = self._require()
        if new_turn:
            self._stop_event.clear()
        text = self.prompt_text(messages, system)
        enc = tok(text, add_special_tokens=False, return_tensors="pt").to(model.device)
        streamer = _streamer_class()(tok)
        stats = GenerationStats(side, prompt_tokens=int(enc["input_ids"].shape[1]))
        errors: list[BaseException] = []
        stop_event = self._stop_event
        kwargs = dict(
            **enc,
            streamer=streamer,
            stopping_criteria=_stop_criteria(stop_event),
            **settings.generate_kwargs(tok),
        )
        started = time.perf_counter()
        streamer.started = started
        thread = threading.Thread(
            target=self._generate_on_thread,
            args=(model, side, settings.seed, kwargs, errors),
            name=f"chat-{side}",
            daemon=True,
        )
        thread.start()
        read_all = False
        try:
            for chunk in streamer:
                if chunk:
                    yield chunk
            read_all = True
        finally:
            if not read_all:
                stop_event.set()  # the reader went away: do not keep generating
            thread.join()
            self.last_stats[side] = _finish_stats(stats, streamer, started, stop_event, settings)
        if errors:
            exc = errors[0]
            if isinstance(exc, ChatError):
                raise exc
            raise ChatError(f"Generation failed on the {SIDE_LABELS[side]} side: {exc}") from exc

    def _generate_on_thread(
        self, model: Any, side: str, seed: int, kwargs: dict[str, Any], errors: list[BaseException]
    ) -> None:
        """Run `generate` under the lock (disable_adapter is global to the model); any error is
        kept for the reader and ends the stream, so the reader never waits forever."""
        import torch

        with self._lock:
            try:
                if self.model is not model:
                    raise ChatError("The model was unloaded.")
                torch.manual_seed(seed)
                adapter_off = model.disable_adapter() if side == SIDE_BASE else None
                with adapter_off or contextlib.nullcontext(), torch.inference_mode():
                    model.generate(**kwargs)
            except BaseException as exc:
                errors.append(exc)
                kwargs["streamer"].end()

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
        """One turn on both sides: yield (side, chunk), base first, then fine-tuned.

        Each side gets its own history (they diverge after the first answer). A Stop halts
        the side that is generating and skips the one that has not started.
        """
        self._stop_event.clear()
        for side in order:
            if self._stop_event.is_set():
                break
            for chunk in self.stream(
                side, histories[side], settings, system=system, new_turn=False
            ):
                yield side, chunk


def with_system(messages: list[Message], system: str | None) -> list[Message]:
    """Put the system prompt first (replacing one already there); blank means none."""
    system = (system or "").strip()
    rest = [dict(m) for m in messages]
    if not system:
        return rest
    if rest and rest[0].get("role") == "system":
        rest = rest[1:]
    return [{"role": "system", "content": system}, *rest]
