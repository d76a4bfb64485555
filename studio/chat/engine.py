"""Chat with a run: the base model and its fine-tune side by side, from ONE loaded model.

The base is loaded once (in 4-bit for a QLoRA run, as it was trained, unless 16-bit is asked)
with the run's LoRA adapter attached by peft. The fine-tuned side ("tuned") generates with the
adapter on; the base side ("base") generates from the very same weights inside
`model.disable_adapter()`, so there is never a second copy in memory. Prompts are rendered with
`studio.data.chat_format.render`, the one template path training used.

Also here, all headless (the Chat tab is a thin layer on top):
- streaming (`TextIteratorStreamer` + `generate` on a thread) with a Stop flag;
- blind mode: random hidden sides, votes appended to `<run>/blind_votes.jsonl` with the tally;
- batch compare: a run's validation split or a prompt file through both sides, scored with
  exact match, ROUGE-L and JSON-format accuracy, saved as `<run>/compare-<timestamp>.csv`;
- `bench_chat`: memory of both sides vs the base alone, time to first token, tokens/s.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import random
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from studio import paths
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

VOTES = ("A", "B", "tie")
VOTES_FILE = "blind_votes.jsonl"
METADATA_FILE = "training_metadata.json"
ADAPTER_CONFIG = "adapter_config.json"

Message = dict[str, str]
BatchProgress = Callable[[int, int, str], None]


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
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool)

    return StoppingCriteriaList([_StopFlag()])


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


def _tensor_bytes(model: Any) -> int:
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


def load_base(path: str | Path, four_bit: bool, device: str | None = None):
    """The base model as training saw it: 16-bit like `models.load_model_for_inference`,
    or NF4 double-quant 4-bit (bitsandbytes) like a QLoRA run."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not four_bit:
        return models.load_model_for_inference(path, device)
    dtype = None if device.startswith("cuda") else torch.float32
    return models.load_model(path, device=device, dtype=dtype, four_bit=True).eval()


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
        from peft import PeftModel

        progress = progress or (lambda _m, _f: None)
        if precision not in PRECISIONS:
            raise ChatError(f"precision: use one of {', '.join(PRECISIONS)}")
        blocker = training_blocker()
        if blocker:
            raise ChatError(blocker)
        source = resolve_adapter(adapter)
        warnings: list[str] = []
        name = (base_model or "").strip() or source.base_model
        if not name:
            raise ChatError(
                f"{source.label}: the run does not say which base model it was trained on;"
                " pick the base model."
            )
        resolved = self._resolve_base(name, source, progress)
        if source.base_model and (base_model or "").strip() not in ("", source.base_model):
            trained_on = source.base_model_path or source.base_model
            if Path(trained_on).resolve() != Path(resolved.path).resolve():
                warnings.append(
                    f"This adapter was trained on {source.base_model}, not {name}: its answers"
                    " may be garbage or loading may fail."
                )
        four_bit = wants_four_bit(source.method, precision)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if source.method == "qlora" and not four_bit:
            warnings.append(
                "QLoRA run loaded in 16-bit: answers can differ slightly from the 4-bit base it"
                " was trained on (and use more memory)."
            )
        self.unload()
        started = time.perf_counter()
        tok = self._tokenizer_for(resolved.path, source, warnings)
        progress(f"Loading {name} ({'4-bit' if four_bit else '16-bit'})", 0.2)
        try:
            base = load_base(resolved.path, four_bit, device)
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
            tensor_bytes=_tensor_bytes(model),
            warnings=warnings,
        )
        with self._lock:
            self.model, self.tokenizer, self.source, self.info = model, tok, source, info
            self.last_stats = {}
        progress("Ready", 1.0)
        return info

    def _resolve_base(self, name: str, source: AdapterSource, progress: Any):
        """Prefer the exact folder the run trained on when the user kept the run's base."""
        saved = source.base_model_path
        if saved and name == source.base_model and models.is_model_dir(Path(saved)):
            return models.ResolvedModel(name, Path(saved), "local")
        try:
            return models.resolve_model(name, progress)
        except models.ModelNotFoundError as exc:
            raise ChatError(str(exc)) from exc

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
        return _tensor_bytes(self.model) if self.model is not None else 0

    # ---- generation

    def stop(self) -> None:
        """Halt the generation in progress at the next token (and the rest of its turn)."""
        self._stop_event.set()

    @property
    def stopped(self) -> bool:
        return self._stop_event.is_set()

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

        def work() -> None:
            import torch

            with self._lock:
                try:
                    if self.model is not model:
                        raise ChatError("The model was unloaded.")
                    torch.manual_seed(settings.seed)
                    adapter_off = model.disable_adapter() if side == SIDE_BASE else None
                    with adapter_off or contextlib.nullcontext(), torch.inference_mode():
                        model.generate(**kwargs)
                except BaseException as exc:
                    errors.append(exc)
                    streamer.end()

        started = time.perf_counter()
        streamer.started = started
        thread = threading.Thread(target=work, name=f"chat-{side}", daemon=True)
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
            stats.total_s = time.perf_counter() - started
            stats.new_tokens = streamer.new_tokens
            if streamer.first_token_at is not None:
                stats.ttft_s = streamer.first_token_at - started
            stats.stopped = stop_event.is_set()
            if not stats.stopped and streamer.new_tokens >= settings.max_new_tokens:
                stats.hit_limit = True
            self.last_stats[side] = stats
        if errors:
            exc = errors[0]
            if isinstance(exc, ChatError):
                raise exc
            raise ChatError(f"Generation failed on the {SIDE_LABELS[side]} side: {exc}") from exc

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


# --------------------------------------------------------------------------- blind mode


def new_blind_assignment(rng: random.Random | None = None) -> dict[str, str]:
    """Which side each hidden panel shows: {"A": "base"|"tuned", "B": the other}."""
    rng = rng or random.SystemRandom()
    first, second = SIDES if rng.random() < 0.5 else SIDES[::-1]
    return {"A": first, "B": second}


def blind_tally(out_dir: str | Path) -> dict[str, Any]:
    """Count the votes saved in `<run>/blind_votes.jsonl` (unreadable lines are skipped).

    adapter_win_rate counts a tie as half a win, the usual convention for pairwise votes.
    """
    tally = {"tuned_wins": 0, "base_wins": 0, "ties": 0, "total": 0}
    path = Path(out_dir) / VOTES_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            winner = rec.get("winner") if isinstance(rec, dict) else None
            key = {"tuned": "tuned_wins", "base": "base_wins", "tie": "ties"}.get(winner)
            if key:
                tally[key] += 1
                tally["total"] += 1
    total = tally["total"]
    tally["adapter_win_rate"] = (
        round((tally["tuned_wins"] + 0.5 * tally["ties"]) / total, 4) if total else None
    )
    return tally


def record_blind_vote(
    out_dir: str | Path,
    vote: str,
    assignment: dict[str, str],
    *,
    prompt: str = "",
    answers: dict[str, str] | None = None,
    settings: GenerationSettings | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Append one vote (and the tally after it) to `<run>/blind_votes.jsonl`; return the tally.

    The file is only ever appended to, so earlier votes are never lost.
    """
    if vote not in VOTES:
        raise ChatError(f"vote: use one of {', '.join(VOTES)}")
    if sorted(assignment.values()) != sorted(SIDES) or set(assignment) != {"A", "B"}:
        raise ChatError("blind assignment must map A and B to the base and fine-tuned sides")
    winner = "tie" if vote == "tie" else assignment[vote]
    before = blind_tally(out_dir)
    key = {"tuned": "tuned_wins", "base": "base_wins", "tie": "ties"}[winner]
    after = dict(before)
    after[key] += 1
    after["total"] += 1
    after["adapter_win_rate"] = round(
        (after["tuned_wins"] + 0.5 * after["ties"]) / after["total"], 4
    )
    record = {
        "time": datetime.now().isoformat(timespec="seconds"),
        "adapter": label,
        "vote": vote,
        "winner": winner,
        "assignment": assignment,
        "prompt": prompt,
        "answers": answers or {},
        "settings": asdict(settings) if settings else None,
        "tally": after,
    }
    path = Path(out_dir) / VOTES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return after


# --------------------------------------------------------------------------- scores

# Scripts written without spaces: each character counts as one token for ROUGE-L.
_NO_SPACE = re.compile(
    r"[\u0E00-\u0EFF\u1000-\u109F\u1780-\u17FF\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uAC00-\uD7AF]"
)
_TOKEN = re.compile(
    r"[\u0E00-\u0EFF\u1000-\u109F\u1780-\u17FF\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uAC00-\uD7AF]|[^\W_]+"
)


def normalize_text(text: str) -> str:
    """NFC, trimmed, inner whitespace collapsed (what exact match compares)."""
    return " ".join(unicodedata.normalize("NFC", text or "").split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_text(prediction) == normalize_text(reference)


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased word tokens; Thai/CJK and other space-less scripts split per character."""
    return _TOKEN.findall(unicodedata.normalize("NFC", text or "").lower())


def _lcs_len(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of tokens over prediction and reference."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 1.0 if not pred and not ref else 0.0
    lcs = _lcs_len(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def parse_json_object(text: str) -> dict[str, Any] | None:
    """A JSON object from a model's answer: the whole text, or inside one ``` fence."""
    text = (text or "").strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S | re.I)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def json_format_ok(prediction: str, reference: str) -> bool | None:
    """None when the reference is not a JSON object; else whether the prediction parses as
    a JSON object carrying every key of the reference (the format a fine-tune should learn)."""
    ref = parse_json_object(reference)
    if ref is None:
        return None
    pred = parse_json_object(prediction)
    return pred is not None and set(ref) <= set(pred)


def score(prediction: str, reference: str | None) -> dict[str, Any]:
    """Per-row scores; all None when there is no reference."""
    if reference is None or not str(reference).strip():
        return {"exact_match": None, "rouge_l": None, "json_ok": None}
    return {
        "exact_match": exact_match(prediction, reference),
        "rouge_l": round(rouge_l(prediction, reference), 4),
        "json_ok": json_format_ok(prediction, reference),
    }


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall scores per side: means over rows that have a (JSON) reference."""
    out: dict[str, Any] = {"rows": len(rows)}
    out["with_reference"] = sum(1 for r in rows if r.get("reference"))
    out["json_references"] = sum(1 for r in rows if r.get("base_json_ok") is not None)
    for side in ("base", "tuned"):
        out[f"{side}_exact_match"] = _mean([r.get(f"{side}_exact_match") for r in rows])
        out[f"{side}_rouge_l"] = _mean([r.get(f"{side}_rouge_l") for r in rows])
        out[f"{side}_json_format"] = _mean([r.get(f"{side}_json_ok") for r in rows])
    return out


# --------------------------------------------------------------------------- batch compare


@dataclass
class BatchItem:
    """One prompt (a conversation without its final answer) and the expected answer."""

    messages: list[Message]
    reference: str | None = None

    @property
    def prompt(self) -> str:
        users = [m.get("content", "") for m in self.messages if m.get("role") == "user"]
        return (
            users[-1] if users else (self.messages[-1].get("content", "") if self.messages else "")
        )


@dataclass
class BatchResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    csv_path: Path | None
    stopped: bool = False


CSV_COLUMNS = [
    "prompt",
    "reference",
    "base",
    "fine_tuned",
    "base_exact_match",
    "tuned_exact_match",
    "base_rouge_l",
    "tuned_rouge_l",
    "base_json_ok",
    "tuned_json_ok",
]

_PROMPT_KEYS = ("prompt", "question", "input_text", "query", "text")
_REFERENCE_KEYS = ("reference", "response", "answer", "output", "completion", "expected")


def item_from_record(rec: Any, where: str) -> BatchItem:
    """A BatchItem from one JSON record: chat messages, ShareGPT, Alpaca or prompt/reference."""
    if isinstance(rec, str):
        return BatchItem([{"role": "user", "content": rec}])
    if not isinstance(rec, dict):
        raise ChatError(f"{where}: expected a JSON object or string, got {type(rec).__name__}")
    convo = rec.get("messages") or rec.get("conversations")
    if isinstance(convo, list):
        msgs: list[Message] = []
        for m in convo:
            if not isinstance(m, dict):
                raise ChatError(f"{where}: each message must be an object with role and content")
            role = m.get("role") or {"human": "user", "gpt": "assistant"}.get(m.get("from", ""))
            content = m.get("content", m.get("value"))
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ChatError(f"{where}: a message lacks a role (system/user/assistant) or text")
            msgs.append({"role": role, "content": content})
        reference = None
        if msgs and msgs[-1]["role"] == "assistant":
            reference = msgs.pop()["content"]
        if not any(m["role"] == "user" for m in msgs):
            raise ChatError(f"{where}: the conversation has no user message to answer")
        return BatchItem(msgs, reference)
    if "instruction" in rec:
        prompt = str(rec.get("instruction") or "")
        if rec.get("input"):
            prompt = f"{prompt}\n\n{rec['input']}"
        msgs = [{"role": "user", "content": prompt}]
        if rec.get("system"):
            msgs.insert(0, {"role": "system", "content": str(rec["system"])})
        out = rec.get("output")
        return BatchItem(msgs, str(out) if out is not None else None)
    key = next((k for k in _PROMPT_KEYS if isinstance(rec.get(k), str)), None)
    if key is None:
        raise ChatError(
            f"{where}: no prompt found; use a 'prompt' field (optionally 'reference'),"
            " chat 'messages', or Alpaca 'instruction'/'output'"
        )
    ref_key = next((k for k in _REFERENCE_KEYS if rec.get(k) is not None), None)
    ref = rec.get(ref_key) if ref_key else None
    if ref is not None and not isinstance(ref, str):
        ref = json.dumps(ref, ensure_ascii=False)  # a JSON reference given as an object
    return BatchItem([{"role": "user", "content": rec[key]}], ref)


def load_prompt_file(path: str | Path, limit: int | None = None) -> list[BatchItem]:
    """Prompts (with optional references) from .jsonl/.json/.csv/.txt.

    .txt: one prompt per line. .csv: a prompt column and optionally a reference column.
    JSON: chat messages (the last assistant turn is the reference), Alpaca, or
    {"prompt": ..., "reference": ...}. Errors name the file and line.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ChatError(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ChatError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    items: list[BatchItem] = []
    suffix = p.suffix.lower()
    if suffix == ".txt":
        items = [
            BatchItem([{"role": "user", "content": line.strip()}])
            for line in text.splitlines()
            if line.strip()
        ]
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        cols = {c.lower().strip(): c for c in (reader.fieldnames or [])}
        pcol = next((cols[k] for k in _PROMPT_KEYS if k in cols), None)
        if pcol is None:
            raise ChatError(f"{p}: line 1: no 'prompt' column (columns: {list(cols.values())})")
        rcol = next((cols[k] for k in _REFERENCE_KEYS if k in cols), None)
        for n, row in enumerate(reader, start=2):
            prompt = (row.get(pcol) or "").strip()
            if not prompt:
                continue
            ref = row.get(rcol) if rcol else None
            items.append(BatchItem([{"role": "user", "content": prompt}], ref or None))
            if limit and len(items) >= limit:
                break
            del n
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ChatError(f"{p}: invalid JSON: {exc}") from exc
        if isinstance(data, dict):
            data = data.get("data") or data.get("rows") or [data]
        if not isinstance(data, list):
            raise ChatError(f"{p}: expected a list of records")
        items = [item_from_record(r, f"{p}: record {i + 1}") for i, r in enumerate(data)]
    else:  # .jsonl and anything else line-based
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise ChatError(f"{p}: line {n}: invalid JSON ({exc.msg})") from exc
            items.append(item_from_record(rec, f"{p}: line {n}"))
            if limit and len(items) >= limit:
                break
    if not items:
        raise ChatError(f"{p}: no prompts found")
    return items[:limit] if limit else items


def validation_items(run_dir: str | Path, limit: int | None = None) -> list[BatchItem]:
    """The run's held-out validation rows: the same seeded split training made.

    Training records the dataset's hash; if the file changed since, the split would not be
    the one the run held out, so that is refused.
    """
    run = Path(run_dir)
    meta = read_json(run / METADATA_FILE)
    try:
        from studio.config import RunConfig
        from studio.train import run as train
    except ImportError as exc:
        raise ChatError(f"the training module is not available: {exc}") from exc
    yaml_path = run / "run.yaml"
    if not yaml_path.is_file():
        raise ChatError(f"{run.name}: no run.yaml, so its validation split is unknown")
    try:
        cfg = RunConfig.load(yaml_path)
        data = train.dataset_file(cfg)
        recorded = (meta.get("dataset") or {}).get("sha256")
        if recorded and data.is_file() and train.file_sha256(data) != recorded:
            raise ChatError(
                f"{data} changed since {run.name} was trained, so its validation split cannot"
                " be rebuilt; use a prompt file instead."
            )
        _, val_rows = train.split_rows(train.load_training_rows(cfg), cfg.val_fraction, cfg.seed)
    except ChatError:
        raise
    except Exception as exc:
        raise ChatError(f"{run.name}: could not rebuild its validation split: {exc}") from exc
    if not val_rows:
        raise ChatError(
            f"{run.name} held out no validation rows (val_fraction 0); use a prompt file."
        )
    items = [
        item_from_record(r, f"{run.name} validation row {i + 1}") for i, r in enumerate(val_rows)
    ]
    return items[:limit] if limit else items


def _timestamped(out_dir: Path, stem: str, suffix: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{stem}-{stamp}{suffix}"
    n = 2
    while path.exists():
        path = out_dir / f"{stem}-{stamp}-{n}{suffix}"
        n += 1
    return path


def write_csv(rows: list[dict[str, Any]], out_dir: str | Path) -> Path:
    """Save compare rows as a new `compare-<timestamp>.csv` (never overwriting one)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = _timestamped(out, "compare", ".csv")
    with path.open("x", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def batch_compare(
    engine: ChatEngine,
    items: list[BatchItem],
    settings: GenerationSettings | None = None,
    *,
    system: str | None = None,
    out_dir: str | Path | None = None,
    progress: BatchProgress | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> BatchResult:
    """Answer every item on both sides, score them, and save the table as CSV.

    A Stop ends the batch after the current answer; the rows done so far are still saved.
    `system` applies only to items that bring no system message of their own; `on_row`
    sees each scored row as soon as it is done (the UI fills its table with it).
    """
    settings = (settings or GenerationSettings()).validate()
    engine._require()
    progress = progress or (lambda _d, _t, _m: None)
    engine._stop_event.clear()
    rows: list[dict[str, Any]] = []
    total = len(items)
    for i, item in enumerate(items):
        progress(i, total, f"Prompt {i + 1}/{total}")
        has_system = bool(item.messages) and item.messages[0].get("role") == "system"
        sys_prompt = None if has_system else system
        answers: dict[str, str] = {}
        for side in SIDES:
            if engine.stopped:
                break
            answers[side] = engine.generate(
                side, item.messages, settings, system=sys_prompt, new_turn=False
            ).strip()
        if engine.stopped:
            break
        row: dict[str, Any] = {
            "prompt": item.prompt,
            "reference": item.reference or "",
            "base": answers[SIDE_BASE],
            "fine_tuned": answers[SIDE_TUNED],
        }
        for side, answer in answers.items():
            for key, value in score(answer, item.reference).items():
                row[f"{side}_{key}"] = value
        rows.append(row)
        if on_row:
            on_row(row)
    stopped = engine.stopped
    progress(len(rows), total, "Stopped" if stopped else "Done")
    target = out_dir or (engine.source.out_dir if engine.source else None)
    csv_path = write_csv(rows, target) if target and rows else None
    return BatchResult(rows, summarize(rows), csv_path, stopped)


# --------------------------------------------------------------------------- benchmark


def _measure_load(kind: str, adapter: str, base: str | None, precision: str, prompt: str) -> None:
    """Child process: load the base alone, or the chat engine, and print its memory as JSON."""
    import psutil
    import torch
    import transformers  # noqa: F401  (libraries count in neither figure)
    from peft import PeftModel  # noqa: F401

    proc = psutil.Process()
    cuda = torch.cuda.is_available()
    gc.collect()
    rss0 = proc.memory_info().rss
    out: dict[str, Any] = {}
    try:
        engine = ChatEngine()
        if kind == "base":
            source = resolve_adapter(adapter)
            resolved = engine._resolve_base(base or source.base_model or "", source, None)
            model = load_base(resolved.path, wants_four_bit(source.method, precision))
            tok = models.load_tokenizer(resolved.path)
            text = chat_format.render(tok, [{"role": "user", "content": prompt}], True)
            enc = tok(text, add_special_tokens=False, return_tensors="pt").to(model.device)
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=8, do_sample=False)
            out["tensor_bytes"] = _tensor_bytes(model)
        else:
            engine.load(adapter, base, precision)
            for side in SIDES:
                engine.generate(
                    side,
                    [{"role": "user", "content": prompt}],
                    GenerationSettings(max_new_tokens=8),
                )
            out["tensor_bytes"] = engine.tensor_bytes()
        gc.collect()
        out["rss_delta"] = proc.memory_info().rss - rss0
        out["cuda_allocated"] = torch.cuda.memory_allocated() if cuda else None
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print("BENCH_RESULT " + json.dumps(out), flush=True)


def _in_child(kind: str, adapter: str, base: str | None, precision: str, prompt: str):
    """Each memory figure in a fresh process, so freed memory cannot blur the comparison."""
    import os
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env[paths.ENV_VAR] = str(paths.data_dir())
    code = (
        "import sys, json; from studio.chat.engine import _measure_load;"
        " _measure_load(*json.loads(sys.argv[1]))"
    )
    args = json.dumps([kind, adapter, base, precision, prompt])
    done = subprocess.run(
        [sys.executable, "-c", code, args],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        check=False,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ChatError(f"benchmark ({kind}) child failed: {' | '.join(tail)}")
    result = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    if "error" in result:
        raise ChatError(f"benchmark ({kind}): {result['error']}")
    return result


def bench_chat(
    model: str | None,
    run_dir: str | Path,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    precision: str = PRECISION_AUTO,
) -> dict[str, Any]:
    """Measure chat memory and speed; returns figures, prints nothing.

    Memory: the base alone vs the chat engine with both sides ready (each loaded in its own
    fresh process, after one generation so working buffers count): process RSS growth and
    weight bytes, and their ratios (goal: at most 1.1). Speed: time to first token and decode
    tokens/s per side, greedy, averaged over the prompts.
    """
    import torch

    if not prompts:
        raise ChatError("bench_chat needs at least one prompt")
    adapter = str(run_dir)
    base_alone = _in_child("base", adapter, model, precision, prompts[0])
    both = _in_child("engine", adapter, model, precision, prompts[0])
    engine = ChatEngine()
    info = engine.load(adapter, model, precision)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    per_side: dict[str, dict[str, list[float]]] = {
        s: {"ttft": [], "tps": [], "n": []} for s in SIDES
    }
    try:
        engine.generate(SIDE_BASE, [{"role": "user", "content": prompts[0]}], settings)  # warm-up
        for p in prompts:
            for side in SIDES:
                engine.generate(side, [{"role": "user", "content": p}], settings)
                st = engine.last_stats[side]
                per_side[side]["ttft"].append(st.ttft_s or 0.0)
                per_side[side]["tps"].append(st.tokens_per_s)
                per_side[side]["n"].append(st.new_tokens)
    finally:
        engine.unload()

    def avg(xs: list[float]) -> float:
        return round(sum(xs) / len(xs), 4) if xs else 0.0

    result: dict[str, Any] = {
        "device": info.device,
        "precision": info.precision,
        "dtype": info.dtype,
        "base_model": info.base_model,
        "adapter": info.label,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "threads": torch.get_num_threads(),
        "memory": {
            "base_alone_rss_mb": round(base_alone["rss_delta"] / 2**20, 1),
            "both_sides_rss_mb": round(both["rss_delta"] / 2**20, 1),
            "rss_ratio": round(both["rss_delta"] / max(base_alone["rss_delta"], 1), 3),
            "base_alone_weights_mb": round(base_alone["tensor_bytes"] / 2**20, 1),
            "both_sides_weights_mb": round(both["tensor_bytes"] / 2**20, 1),
            "weights_ratio": round(both["tensor_bytes"] / max(base_alone["tensor_bytes"], 1), 4),
        },
    }
    if base_alone.get("cuda_allocated"):
        result["memory"]["cuda_ratio"] = round(
            both["cuda_allocated"] / base_alone["cuda_allocated"], 3
        )
    for side in SIDES:
        result[SIDE_LABELS[side]] = {
            "ttft_s": avg(per_side[side]["ttft"]),
            "tokens_per_s": avg(per_side[side]["tps"]),
            "new_tokens": avg(per_side[side]["n"]),
        }
    return result
