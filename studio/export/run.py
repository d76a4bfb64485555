"""Export a run: a merged model, a GGUF file and an Ollama Modelfile.

Run headless (the Chat tab's Export section calls the same `export_run`):

    python -m studio.export RUN_DIR [--gguf f16|q8_0|none] [--out DIR] [--data-dir DIR]

Steps, each checked:
1. Merge: the base is loaded in float32 (never 4-bit, even for QLoRA runs: adding the LoRA
   delta to 4-bit weights would round it away); the run's adapter is attached with peft and
   `merge_and_unload` folds it in exactly. The result is saved as safetensors with the
   tokenizer and chat template in `merged/`, in float32 for small models, else in float16,
   or in bfloat16 only where a merged weight is beyond float16's range (`choose_save_dtype`):
   bf16's 8-bit mantissa rounds a short run's small delta away.
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
end (or `export-<ts>/` when an earlier export exists: nothing is ever overwritten). Each step
is recorded in its export_info.json as it starts and when it is done. A failure before the
merged model is complete removes the partial folder; a later one (the GGUF check, the chat
format) keeps what was built, records the failed step, and the ExportError gives the command
that retries it: `python -m studio.export RUN_DIR --resume EXPORT_DIR` runs only the steps not
done yet (`export_run(..., resume=EXPORT_DIR)`).

The stages live in `merge`, `gguf` and `ollama`; this module runs them in order and owns the
export folder; `cli` is the command line.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from studio import compat, gpu
from studio.data import chat_format
from studio.export import merge, prequant
from studio.export.common import (
    ExportError,
    Message,
    Progress,
    noop,
)
from studio.export.gguf import (
    check_gguf,
    convert_to_gguf,
    converter_type,
    local_quantizer,
    normalize_gguf_type,
    quantize_gguf,
    quantize_route,
    route_note,
    verify_plan,
)
from studio.export.merge import SANITY_TOKENS, SanityCase, SanityCheck, SavedDtype, merge_adapter
from studio.export.ollama import (
    ChatFormat,
    build_modelfile,
    create_command,
    derive_chat_format,
    ollama_name,
    sampling_parameters,
    stop_tokens,
)
from studio.models import loader as models
from studio.models.generate import greedy_each
from studio.runs import ADAPTER_CONFIG, EXPORT, Run, RunError, is_adapter_dir, open_run, read_json
from studio.util import is_disk_full, new_path, short_error

EXPORT_INFO = "export_info.json"
MODELFILE = "Modelfile"
MERGED = "merged"
DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Viết một câu chào khách hàng ngắn.",
    "My order has not arrived yet. What should I do?",
)
SANITY_PROMPTS = 3
QLORA_NOTE = (
    "QLoRA trains the adapter on top of a 4-bit (NF4) copy of the base. The export merges it"
    " into the original 16-bit base instead, in float32: adding the small LoRA update to 4-bit"
    " weights would round most of it away, and the merged unquantized model is what GGUF and"
    " Ollama take as input. The sanity check therefore compares against base(16-bit)+adapter;"
    " answers can differ slightly from the 4-bit chat you saw during training."
)


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
    merge_precision: str  # how the merge was done and saved, and why
    merge_check: SanityCheck
    gguf_check: SanityCheck | None
    template_family: str
    template_exact: bool
    system_prompt: str | None
    files: list[tuple[str, int]]  # (path relative to export_dir, bytes)
    warnings: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)
    saved_dtype: SavedDtype | None = None  # the merged folder's dtype and the reason
    gguf_route: str = ""  # k-quants: which quantizer made the file, or that Ollama will

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["merge_check"]["passed"] = self.merge_check.passed
        if self.gguf_check is not None:
            data["gguf_check"]["passed"] = self.gguf_check.passed
        return data


# --------------------------------------------------------------------------- the run


def inspect_run(run_dir: str | Path) -> Run:
    """The run (`runs.open_run`, the one reader of a run folder), checked to hold what an
    export needs; ExportError says what is missing."""
    try:
        run = open_run(run_dir)
    except RunError as exc:
        raise ExportError(str(exc)) from exc
    adapter = run.adapter_dir
    if not is_adapter_dir(adapter):
        raise ExportError(
            f"{run.name}: no trained adapter (expected {adapter}/{ADAPTER_CONFIG}). The run"
            " may still be training, or it failed before saving; pick a finished run."
        )
    if not run.has_adapter:
        raise ExportError(
            f"{run.name}: the adapter folder has no weights (adapter_model.safetensors is"
            " missing). Re-run the training or pick another run."
        )
    if not run.base_model:
        raise ExportError(
            f"{run.name}: cannot tell which base model this run used (no training_metadata.json"
            " or run.yaml naming it)."
        )
    return run


def resolve_base(src: Run, progress: Progress | None = None) -> models.ResolvedModel:
    """The run's base model on disk (`models.resolve_run_base`: its recorded folder, else
    resolved by name)."""
    try:
        return models.resolve_run_base(src, None, progress)
    except models.ModelNotFoundError as exc:
        raise ExportError(f"{exc}\nThe adapter cannot be merged without it.") from exc


def past_exports(run: Run) -> list[str]:
    """The names of a run's complete exports (export/, export-<time>/), for the run picker."""
    return sorted(
        p.name
        for p in run.path.glob(f"{EXPORT}*")
        if read_json(p / EXPORT_INFO).get("status", "complete") == "complete"
    )


def _training_rows(src: Run) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """The run's (all rows, held-out rows, why they are missing): `run_split`, which refuses
    a dataset changed since training (then the export says so and uses default prompts)."""
    from studio.data.load import ChangedDataError, run_split

    try:
        train, val = run_split(src)
    except ChangedDataError as exc:
        return [], [], f"{exc}; the sanity check used default prompts and no training rows."
    return train + val, val, None


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


def _command_path(path: Path) -> str:
    return compat.shell_quote(path)


# --------------------------------------------------------------------------- the export


def _export_target(run_dir: Path, out: str | Path | None, stamp: str) -> Path:
    """Where the finished export goes: export/ unless it exists, then export-<stamp>/."""
    target = Path(out).expanduser().resolve() if out else run_dir / EXPORT
    if not target.exists():
        return target
    try:
        return new_path(target.parent, target.name, stamp=stamp)
    except FileExistsError as exc:
        raise ExportError(f"Too many exports next to {target}; remove some old ones.") from exc


def _needed_bytes(base_path: Path, gguf: str) -> int:
    """Disk space an export takes: merged weights (see choose_save_dtype) plus the GGUF file."""
    params = merge.param_count(base_path)
    merged = params * (4 if params < merge.FP32_MAX_PARAMS else 2)
    # k-quants keep the f16 file they are made from (bytes per parameter, embeddings included)
    per_param = {"f16": 2, "q8_0": 1.07, "q4_K_M": 2.6, "q5_K_M": 2.72, "q6_K": 2.83}
    gguf_bytes = params * per_param.get(gguf, 0)
    return int(merged + gguf_bytes + 50_000_000)


def _disk_error(exc: BaseException, where: Path) -> ExportError:
    if is_disk_full(exc):
        return ExportError(
            f"The disk holding {where} is full ({short_error(exc)}). Free some space and export"
            " again; nothing was left behind."
        )
    return ExportError(
        f"Could not write the export under {where}: {short_error(exc)}. Nothing was left behind."
    )


_export_lock = threading.Lock()
STEPS = ("merge", "gguf", "ollama")


def _record(folder: Path, **changes: Any) -> dict[str, Any]:
    """Update the export's export_info.json (the record of which steps are done) atomically."""
    from studio.runs import atomic_write_json

    info = read_json(folder / EXPORT_INFO)
    info.update(changes)
    atomic_write_json(folder / EXPORT_INFO, info)
    return info


def _merged_complete(folder: Path) -> bool:
    """merged/ was written and checked: its step is recorded done and its weights are there."""
    info = read_json(folder / EXPORT_INFO)
    merged = folder / MERGED
    return (
        bool((info.get("steps") or {}).get("merge"))
        and (merged / "config.json").is_file()
        and any(merged.glob("*.safetensors"))
    )


def _resume_dir(resume: str | Path, src: Run) -> Path:
    """An earlier export of this run whose merged model is complete, to finish in place."""
    folder = Path(resume).expanduser().resolve()
    if not (folder / EXPORT_INFO).is_file():
        raise ExportError(f"{folder}: not an export folder (no {EXPORT_INFO}).")
    recorded = read_json(folder / EXPORT_INFO).get("run_dir")
    if recorded and Path(recorded).resolve() != src.path:
        raise ExportError(f"{folder} is an export of {Path(recorded).name}, not of {src.name}.")
    if not _merged_complete(folder):
        raise ExportError(
            f"{folder}: its merged model is not complete, so there is nothing to resume from;"
            " export again without --resume."
        )
    return folder


def _kept_error(exc: BaseException, src: Run, partial: Path, gguf: str) -> ExportError:
    """Record the failed step in export_info.json, and say how to retry just that step."""
    info = read_json(partial / EXPORT_INFO)
    step = info.get("current") or "?"
    _record(partial, status="failed", failed_step=step, error=short_error(exc))
    cmd = (
        f"python -m studio.export {_command_path(src.path)} --gguf {gguf}"
        f" --resume {_command_path(partial)}"
    )
    built = "the checked merged model" + (
        ", the GGUF file" if (info.get("steps") or {}).get("gguf") else ""
    )
    return ExportError(
        f"Export of {src.name} failed at the {step} step: {short_error(exc)}. What was built"
        f" ({built}) is kept in {partial}. Retry the failed step with: {cmd}"
    )


def export_run(
    run_dir: str | Path,
    gguf: str = "f16",
    out: str | Path | None = None,
    progress: Progress | None = None,
    *,
    max_new_tokens: int = SANITY_TOKENS,
    n_prompts: int = SANITY_PROMPTS,
    verify_gguf: bool = True,
    resume: str | Path | None = None,
) -> ExportResult:
    """Export a run (merged model, optional GGUF, Modelfile); see the module docstring.

    resume: an earlier export folder whose merged model is complete (a failed export keeps
    it and says so): the steps not recorded as done in its export_info.json are run again.
    """
    from studio import heavy

    heavy.ready()  # one thread imports torch/transformers at a time
    progress = progress or noop
    gguf = normalize_gguf_type(gguf)  # "Q4_K_M" -> "q4_K_M"; ExportError when unknown
    t0 = time.time()
    progress("Checking the run", 0.01)
    src = inspect_run(run_dir)
    base = resolve_base(src, lambda m, f: progress(f"[base model] {m}", 0.02 + 0.03 * f))
    base = prequant.merge_base(src, base, lambda m, f: progress(f"[16-bit base] {m}", 0.05))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if not _export_lock.acquire(blocking=False):
        raise ExportError("Another export is running; wait for it to finish.")
    try:
        if resume is not None:
            partial = _resume_dir(resume, src)
            target = partial  # a finished export gets its missing step in place
            if ".partial-" in partial.name:
                target = _export_target(src.path, out, stamp)
        else:
            target = _export_target(src.path, out, stamp)
            partial = target.with_name(f"{target.name}.partial-{stamp}")
            _check_space(target, base.path, gguf)
        plan = ExportPlan(
            src=src,
            base=base,
            partial=partial,
            target=target,
            gguf=gguf,
            progress=progress,
            max_new_tokens=max_new_tokens,
            n_prompts=n_prompts,
            verify_gguf=verify_gguf,
        )
        result = _run_steps(plan)
    finally:
        _export_lock.release()
    result.seconds = round(time.time() - t0, 1)
    with contextlib.suppress(OSError):  # the export is complete; this is only a record
        _record(target, **result.to_dict(), status="complete", failed_step=None, error=None)
    progress("Export finished", 1.0)
    return result


def _check_space(target: Path, base_path: Path, gguf: str) -> None:
    """Refuse before writing anything when the disk cannot hold the export."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
    except OSError as exc:
        raise _disk_error(exc, target.parent) from exc
    need = _needed_bytes(base_path, gguf)
    if free < need:
        raise ExportError(
            f"Not enough disk space under {target.parent}: the export needs about"
            f" {need / 1e9:.1f} GB, {free / 1e9:.1f} GB are free. Free some space, or pick"
            " a smaller GGUF type (q8_0) or none."
        )


def _run_steps(plan: ExportPlan) -> ExportResult:
    """The steps into `partial`, renamed to `target` at the end.

    A failure before the merged model is complete removes the folder (nothing usable was
    built); after it, the folder is kept with the failed step recorded, for --resume.
    """
    src, partial, target, gguf = plan.src, plan.partial, plan.target, plan.gguf
    try:
        if not partial.exists():
            partial.mkdir(parents=True)
            _record(partial, run_dir=str(src.path), status="running", steps={})
        result = _export_into(plan)
        if partial != target:
            compat.replace(partial, target)
        return result
    except Exception as exc:
        if _merged_complete(partial):
            raise _kept_error(exc, src, partial, gguf) from exc
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, ExportError):
            raise
        if isinstance(exc, OSError) or is_disk_full(exc):
            raise _disk_error(exc, target.parent) from exc
        raise ExportError(
            f"Export of {src.name} failed: {short_error(exc)}. Nothing was left behind."
        ) from exc
    except BaseException:  # KeyboardInterrupt, SystemExit: keep a complete merge, then go
        if not _merged_complete(partial):
            shutil.rmtree(partial, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                _record(
                    partial,
                    status="failed",
                    failed_step=read_json(partial / EXPORT_INFO).get("current"),
                    error="interrupted",
                )
        raise


def _sanity_check(data: dict[str, Any] | None) -> SanityCheck | None:
    """A SanityCheck back from its export_info.json form."""
    if not data:
        return None
    fields = {k: v for k, v in data.items() if k in ("title", "note", "adapter_effect")}
    return SanityCheck(cases=[SanityCase(**c) for c in data.get("cases", [])], **fields)


def _merge_step(
    src: Run,
    base: models.ResolvedModel,
    partial: Path,
    convs: list[list[Message]],
    progress: Progress,
    max_new_tokens: int,
) -> tuple[SanityCheck, SavedDtype, Any, list[list[int]], Any]:
    """Merge into partial/merged, or take the merged model an earlier try completed."""
    merged_dir = partial / MERGED
    steps = read_json(partial / EXPORT_INFO).get("steps") or {}
    if _merged_complete(partial):
        progress("Reusing the merged model the earlier export completed", 0.4)
        done = steps["merge"]
        tok = models.load_run_tokenizer(src.adapter_dir, base.path, src.chat_template)
        prompt_ids = [merge.encode_prompt(tok, c) for c in convs]
        check = _sanity_check(done["check"])
        return check, SavedDtype(**done["saved"]), tok, prompt_ids, None
    shutil.rmtree(merged_dir, ignore_errors=True)
    merged_dir.mkdir()
    check, saved, tok, prompt_ids, merged_out = merge_adapter(
        src, base, merged_dir, convs, progress, max_new_tokens
    )
    steps["merge"] = {"check": asdict(check), "saved": asdict(saved)}
    _record(partial, steps=steps)
    return check, saved, tok, prompt_ids, merged_out


def _merged_answers(
    src: Run, merged_dir: Path, tok: Any, prompt_ids: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], list[Any]]:
    """The merged model's greedy answers and logits (what the GGUF is compared with), for a
    resumed export whose merge ran in an earlier process."""
    device, dtype, _ = merge.choose_precision(merged_dir)
    model = models.load_model(
        merged_dir,
        device=device,
        dtype=merge.torch_dtype(dtype),
        trust_remote_code=src.trust_remote_code,
    ).eval()
    got = greedy_each(model, tok, prompt_ids, max_new_tokens)
    own = [merge.teacher_logits(model, p, g) for p, g in zip(prompt_ids, got, strict=True)]
    del model
    gpu.free_memory()
    return got, own


def _export_into(plan: ExportPlan) -> ExportResult:
    """All writing happens here, inside `partial`; paths in the result point at `target`.

    Each step is recorded in export_info.json as it starts ("current") and when it is done
    ("steps"), so a failure names its step and a retry skips what is done.
    """
    src, base, partial, target, gguf = plan.src, plan.base, plan.partial, plan.target, plan.gguf
    progress, max_new_tokens = plan.progress, plan.max_new_tokens
    warnings: list[str] = []
    notes: list[str] = []
    rows, val, missing = _training_rows(src)
    convs = sanity_prompts(val or rows, plan.n_prompts)
    if missing:
        notes.append(missing)
    if src.method == "qlora":
        notes.append(QLORA_NOTE)
    notes += prequant.notes(src, base)  # merged onto the 16-bit original

    _record(partial, current="merge")
    merged_dir = partial / MERGED
    check, saved, tok, prompt_ids, merged_out = _merge_step(
        src, base, partial, convs, progress, max_new_tokens
    )
    warnings += _merge_warnings(src, saved, check, tok, gguf)

    _record(partial, current="gguf")
    job = GgufJob(
        plan=plan,
        tok=tok,
        convs=convs,
        prompt_ids=prompt_ids,
        merged_out=merged_out,
        warnings=warnings,
    )
    gguf_file, gguf_check = _gguf_resumable(job)

    _record(partial, current="ollama")
    progress("Writing the Ollama Modelfile", 0.95)
    fmt = derive_chat_format(tok)
    if not fmt.exact:
        warnings.append("The Ollama TEMPLATE is approximated; see the comment in the Modelfile.")
    system, text = _modelfile(
        src, base, merged_dir, saved, fmt, tok, gguf_file, rows, quantize_route(gguf, gguf_file)
    )
    (partial / MODELFILE).write_text(text, encoding="utf-8")
    name = ollama_name(src.name)

    files = sorted(
        (p.relative_to(partial).as_posix(), p.stat().st_size)
        for p in partial.rglob("*")
        if p.is_file() and p.name != EXPORT_INFO
    )
    modelfile = target / MODELFILE
    return ExportResult(
        run_dir=str(src.path),
        export_dir=str(target),
        merged_dir=str(target / MERGED),
        gguf_path=str(target / gguf_file.name) if gguf_file else None,
        gguf_type=("f16" if quantize_route(gguf, gguf_file) else gguf) if gguf_file else "none",
        modelfile_path=str(modelfile),
        modelfile=text,
        ollama_name=name,
        create_command=create_command(
            name, _command_path(modelfile), quantize_route(gguf, gguf_file)
        ),
        run_command=f"ollama run {name}",
        method=src.method,
        base_model=base.name,
        merge_precision=saved.note,
        merge_check=check,
        gguf_check=gguf_check,
        template_family=fmt.family,
        template_exact=fmt.exact,
        system_prompt=system,
        files=files,
        warnings=warnings,
        seconds=0.0,
        notes=notes,
        saved_dtype=saved,
        gguf_route=_route(gguf, gguf_file),
    )


def _route(gguf: str, gguf_file: Path | None) -> str:
    """Which tool made which GGUF file (k-quants: llama.cpp's quantizer here, or Ollama's)."""
    why = local_quantizer() if quantize_route(gguf, gguf_file) else None
    return route_note(gguf, gguf_file, why if isinstance(why, str) else None) or ""


@dataclass(frozen=True, kw_only=True)
class ExportPlan:
    """One export as `export_run` settled it: the run, its base, the folder written into
    (`partial`, renamed to `target` when done) and the user's choices."""

    src: Run
    base: models.ResolvedModel
    partial: Path
    target: Path
    gguf: str
    progress: Progress
    max_new_tokens: int
    n_prompts: int
    verify_gguf: bool


@dataclass(frozen=True, kw_only=True)
class GgufJob:
    """What the GGUF step needs, built once by `_export_into` and handed down its helpers.

    `warnings` is the export's own list: the steps append to it. `merged_out` is the merged
    model's (answers, logits) that the GGUF is compared with; None when the merge ran in an
    earlier process (a resumed export), then recomputed if the GGUF is to be verified.
    """

    plan: ExportPlan
    tok: Any
    convs: list[list[Message]]
    prompt_ids: list[list[int]]
    merged_out: tuple[list[list[int]], list[Any]] | None
    warnings: list[str]


def _gguf_resumable(job: GgufJob) -> tuple[Path | None, SanityCheck | None]:
    """The GGUF step, or the file and check an earlier try completed; recorded when done."""
    if job.plan.gguf == "none":
        return None, None
    partial = job.plan.partial
    steps = read_json(partial / EXPORT_INFO).get("steps") or {}
    done = steps.get("gguf")
    if done and done.get("type") == job.plan.gguf and (partial / done["file"]).is_file():
        job.plan.progress("Reusing the GGUF file the earlier export completed", 0.85)
        return partial / done["file"], _sanity_check(done.get("check"))
    if job.merged_out is None and job.plan.verify_gguf:
        job.plan.progress("Greedy answers of the merged model (to compare the GGUF with)", 0.5)
        merged_out = _merged_answers(
            job.plan.src, partial / MERGED, job.tok, job.prompt_ids, job.plan.max_new_tokens
        )
        job = replace(job, merged_out=merged_out)
    gguf_file, gguf_check = _gguf_step(job)
    if gguf_file is not None:
        steps["gguf"] = {
            "type": job.plan.gguf,
            "file": gguf_file.name,
            "check": asdict(gguf_check) if gguf_check else None,
        }
        _record(partial, steps=steps)
    return gguf_file, gguf_check


def _merge_warnings(
    src: Run, saved: SavedDtype, check: SanityCheck, tok: Any, gguf: str
) -> list[str]:
    """What the merge step found that the user must know before using the export."""
    warnings: list[str] = []
    if saved.dtype == "bfloat16" and converter_type(gguf) == "f16":
        warnings.append(
            f"A weight of {saved.largest} ({saved.max_abs:.4g}) is beyond float16's safe range,"
            " and a GGUF f16 file stores float16: it may overflow there (the GGUF check shows"
            " it). q8_0 stores such tensors with per-block scales that stay in range."
        )
    if not check.passed:
        warnings.append(
            "The merged model does not reproduce base+adapter (see the sanity check): its answers"
            " split where the top tokens were not tied, or its logits moved more than rounding"
            " explains. Do not use this export; report the run."
        )
    recorded = src.template_hash
    if recorded and recorded != chat_format.template_hash(tok):
        warnings.append(
            "The tokenizer/chat template differs from the one the run was trained with"
            f" (hash {chat_format.template_hash(tok)} vs {recorded})."
        )
    return warnings


def _gguf_step(job: GgufJob) -> tuple[Path | None, SanityCheck | None]:
    """The GGUF file: converted and checked, then, for a k-quant, quantized where llama.cpp's
    quantizer loads (else the f16 file is kept for `ollama create --quantize`)."""
    gguf_file, gguf_check = _convert_and_check(job)
    if gguf_file is None or converter_type(job.plan.gguf) == job.plan.gguf:
        return gguf_file, gguf_check
    try:
        made = quantize_gguf(gguf_file, job.plan.gguf, job.plan.progress)
    except ExportError as exc:
        job.warnings.append(
            f"{exc} The f16 GGUF is kept; Ollama can quantize it (see the commands)."
        )
        return gguf_file, gguf_check
    return (made if isinstance(made, Path) else gguf_file), gguf_check


def _convert_and_check(job: GgufJob) -> tuple[Path | None, SanityCheck | None]:
    """Convert to GGUF and check it; a failed conversion is a warning, not a failed export.

    The check compares against `job.merged_out` (answers, logits) from `merge_adapter`.
    """
    export, warnings = job.plan, job.warnings
    gguf, progress, name = export.gguf, export.progress, export.src.name
    outtype = converter_type(gguf)  # k-quants are made from the f16 file, checked first
    fname = f"{ollama_name(name)}-{outtype}.gguf"
    try:
        gguf_file = convert_to_gguf(
            export.partial / MERGED, export.partial / fname, outtype, name, progress
        )
    except ExportError as exc:
        warnings.append(f"No GGUF file: {exc} The merged folder and Modelfile are still usable.")
        return None, None
    if not export.verify_gguf:
        return gguf_file, None
    plan = verify_plan(gguf_file)
    if plan.device is None:
        warnings.append(f"The {gguf} GGUF file was {plan.reason}")
        return gguf_file, None
    progress(f"Loading the GGUF back with transformers ({plan.reason}) to compare answers", 0.82)
    gguf_check = check_gguf(
        gguf_file, job.tok, job.convs, job.prompt_ids, job.merged_out, export.max_new_tokens, plan
    )
    if not gguf_check.passed:
        warnings.append(
            f"The {gguf} GGUF's answers differ from the merged model's beyond rounding"
            " (see the sanity check): the file may be converted wrongly."
        )
    return gguf_file, gguf_check


def _system_prompt(rows: list[dict[str, Any]], default: str | None) -> tuple[str | None, str]:
    """The Modelfile's SYSTEM (from the training rows, else the template's default) and why."""
    system, n_with, common = shared_system_prompt(rows)
    if system:
        return system, f"the system prompt shared by all {len(rows)} training rows."
    if not default:
        return None, "neither the training rows nor the chat template set a default."
    note = "the chat template's default system prompt"
    if common:
        note += (
            f" ({n_with} of {len(rows)} training rows used their own system prompt, the"
            f" commonest being {json.dumps(common, ensure_ascii=False)[:200]}; set SYSTEM to"
            " it when you call the model that way)"
        )
    return default, note + "."


def _generation_eos(merged_dir: Path) -> list[int]:
    """The merged model's generation-config EOS ids (one id or a list in the file)."""
    eos = read_json(merged_dir / "generation_config.json").get("eos_token_id")
    return [int(i) for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]


def _modelfile(
    src: Run,
    base: models.ResolvedModel,
    merged_dir: Path,
    saved: SavedDtype,
    fmt: ChatFormat,
    tok: Any,
    gguf_file: Path | None,
    rows: list[dict[str, Any]],
    quantize: str | None = None,
) -> tuple[str | None, str]:
    """(SYSTEM, the Modelfile text): FROM the GGUF (else the merged folder), with a header.

    `quantize`: the k-quant Ollama applies to the f16 file (`ollama create --quantize`)."""
    system, system_note = _system_prompt(rows, fmt.default_system)
    if fmt.system_mode == "none":
        system = None
    params, params_source = sampling_parameters(merged_dir, base.path)
    name = ollama_name(src.name)
    header = [
        f"Ollama Modelfile for the LoRA Studio run {src.name}",
        f"base {src.base_model}, {src.method}, merged {saved.merge}, saved in {saved.dtype}",
        "FROM is relative to this file: keep it next to "
        + (gguf_file.name if gguf_file else "the merged/ folder")
        + ".",
        f"Create: {create_command(name, 'Modelfile', quantize)}    Run: ollama run {name}",
    ]
    return system, build_modelfile(
        from_path=f"./{gguf_file.name}" if gguf_file else f"./{MERGED}",
        fmt=fmt,
        stops=stop_tokens(fmt, tok, _generation_eos(merged_dir)),
        system=system,
        system_note=system_note,
        params=params,
        params_source=params_source,
        header=header,
    )
