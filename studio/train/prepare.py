"""Preparing a run: a RunConfig becomes a PreparedRun, then the run's tokenized rows.

The first stage of the pipe `prepare -> recipe.build -> loop`, in two calls:

- `prepare_run(cfg)` / `prepare_resume(run_dir)`: everything that can refuse a run cheaply,
  so a bad setting comes back to the Train tab at once instead of minutes later: validation,
  the device choice, the dataset read ONCE through `studio.data` (the Dataset tab's own
  loader), the PII gate on those rows, the seeded split, and the run folder with its run.yaml
  and metadata.
- `tokenize_run(prepared, say)`: the base model resolved, its tokenizer loaded, the rows
  tokenized (or the cached tokens of an unchanged Start reused). It runs in the job's thread
  (a hub model may download for minutes), inside the run's record (`loop.recording`).

Next stage: `studio.train.loop.train(live, tokens)`, which calls `recipe.build` once.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio import __version__, runs
from studio.config import ConfigError, RunConfig
from studio.data.chat_format import TemplateError, tokenize_conversation
from studio.data.load import SAMPLE_DATASET, SAMPLE_PREFERENCES
from studio.train import distributed

if TYPE_CHECKING:
    from studio.data.load import DatasetReport
    from studio.models.loader import ResolvedModel


@dataclass
class PreparedRun:
    """A run that passed every check that needs no model: its folder exists, data is read."""

    cfg: RunConfig
    run_dir: Path
    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    device: str
    device_reason: str
    resume_from: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    expected_device: str = "any"  # what the settings meant: cuda, cpu or any
    power_w: float = 0.0  # board power while training, for the electricity estimate


@dataclass
class Tokens:
    """What the loop trains on, as the model reads it: prepare's last product."""

    base: ResolvedModel  # the base model's folder (fetched or converted if needed)
    tokenizer: Any
    train: list[dict[str, list[int]]]  # input_ids + labels per row
    val: list[dict[str, list[int]]]


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# --- data ---------------------------------------------------------------------------------


def dataset_file(cfg: RunConfig) -> Path:
    """The file a run trains on: the configured one, or the bundled sample (the preference
    sample for DPO)."""
    if cfg.dataset_path:
        return Path(cfg.dataset_path).expanduser().resolve()
    return SAMPLE_PREFERENCES if cfg.objective == "dpo" else SAMPLE_DATASET


def read_dataset(cfg: RunConfig) -> DatasetReport:
    """The run's one read of its dataset file, through the Dataset tab's own loader (every
    format, errors with line numbers), so training sees exactly what the Dataset tab
    validated. The PII gate scans these rows too, rather than reading the file again."""
    from studio.data import load as data

    path = dataset_file(cfg)
    if not path.is_file():
        raise ConfigError("dataset_path", f"no such file: {path}")
    try:
        report = data.load_dataset_file(path, fmt=cfg.dataset_format)
    except data.DatasetError as exc:
        raise ConfigError("dataset_path", str(exc)) from exc
    if not report.rows:
        first = str(report.errors[0]) if report.errors else "no usable conversations"
        raise ConfigError("dataset_path", f"{path.name}: no usable rows ({first})")
    if cfg.objective == "dpo" and report.format != "preference":
        raise ConfigError(
            "objective",
            f"DPO trains on preference rows (prompt, chosen, rejected); {path.name} holds"
            f" {report.format} rows: pick a preference dataset, or SFT",
        )
    return report


def training_rows(report: DatasetReport) -> list[dict[str, Any]]:
    """The rows a run trains on, as {"messages": [...]} dicts (with prompt/chosen/rejected
    for preference rows)."""
    from studio.data.load import training_row

    return [training_row(row) for row in report.rows]


def load_training_rows(cfg: RunConfig) -> list[dict[str, Any]]:
    """The rows of the configured dataset (the Train tab's plan, Chat's validation prompts)."""
    return training_rows(read_dataset(cfg))


def split_rows(
    rows: list[dict[str, Any]], val_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The seeded train/validation split, the same one the Dataset tab shows."""
    from studio.data.split import split_rows as dataset_split

    return dataset_split(rows, val_fraction, seed)


def file_sha256(path: Path) -> str:
    """The dataset file's hash, recorded in the run's metadata (same as the PII scan key)."""
    from studio.data.pii import file_sha256 as sha256_of

    return sha256_of(path)


def check_pii(cfg: RunConfig, report: DatasetReport | None = None) -> int | None:
    """The PII gate of every run (Train tab, CLI, resume): refuse unresolved findings unless
    the user confirmed (allow_pii).

    A file with no scan for its current content is scanned here, so a dataset the Dataset tab
    never saw is checked too; a scan that cannot run refuses the run rather than passing it.
    `report`: the file as the run read it, scanned instead of reading it again.
    Returns the number of findings, or None when allow_pii made the scan unnecessary.
    """
    from studio.data.read import DatasetError
    from studio.data.scan import PIICheckError, file_pii_count

    if cfg.allow_pii:
        return None
    path = dataset_file(cfg)
    if not path.is_file():
        raise ConfigError("dataset_path", f"no such file: {path}")
    try:
        count = file_pii_count(path, cfg.dataset_format, report)
    except DatasetError as exc:
        raise ConfigError("dataset_path", str(exc)) from exc
    except PIICheckError as exc:
        raise ConfigError(
            "allow_pii", f"{exc}; fix that, or confirm to train without the check (allow_pii: true)"
        ) from exc
    if count:
        raise ConfigError(
            "allow_pii",
            f"{count} possible personal-data finding(s) in {path.name} are unresolved:"
            " redact them in the Dataset tab, or confirm to train anyway (allow_pii: true)",
        )
    return count


def check_settings(cfg: RunConfig, report: DatasetReport | None = None) -> tuple[str, str]:
    """Every check a run passes before it starts or resumes: one path for both.

    Validation, the device (with its reason), optimizers that need a GPU, and the PII gate
    (on `report`, the rows the run read, when given).
    """
    cfg.validate()
    device, reason = resolve_device(cfg)
    if device != "cuda" and cfg.optimizer != "adamw_torch":
        raise ConfigError("optimizer", f"{cfg.optimizer} needs a CUDA GPU; use adamw_torch on CPU")
    check_pii(cfg, report)
    return device, reason


def _checked_rows(cfg: RunConfig) -> tuple[str, str, DatasetReport]:
    """`check_settings` on the dataset's one read: the settings first (a bad field costs no
    read), then the file, whose rows the PII gate scans and the run trains on."""
    cfg.validate()
    report = read_dataset(cfg)
    device, reason = check_settings(cfg, report)
    return device, reason, report


def tokenize_rows(
    tok: Any, rows: list[dict[str, Any]], cfg: RunConfig, required: bool = True
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """input_ids + labels per row (-100 where no loss), with the one shared chat_format.

    Labels are built here, not by a collator, so pad == eos can never mask the end-of-turn
    token. Rows left with nothing to learn (truncated before the reply) are dropped.
    """
    out: list[dict[str, list[int]]] = []
    stats = {"rows": len(rows), "dropped": 0, "truncated": 0, "tokens": 0, "trained_tokens": 0}
    first_error = ""
    for row in rows:
        try:
            conv = tokenize_conversation(tok, row["messages"], cfg.max_seq_len)
        except TemplateError as exc:
            stats["dropped"] += 1
            first_error = first_error or str(exc)
            continue
        if cfg.assistant_only_loss:
            labels = [
                t if m else -100 for t, m in zip(conv.input_ids, conv.assistant_mask, strict=True)
            ]
        else:  # every token trains except weight-0 replies (OpenAI format: context only)
            skip = conv.context_mask or [0] * len(conv.input_ids)
            labels = [-100 if s else t for t, s in zip(conv.input_ids, skip, strict=True)]
        if len(labels) < 2 or all(x == -100 for x in labels[1:]):
            stats["dropped"] += 1
            continue
        stats["truncated"] += int(conv.truncated)
        stats["tokens"] += len(conv.input_ids)
        stats["trained_tokens"] += sum(x != -100 for x in labels[1:])
        out.append({"input_ids": conv.input_ids, "labels": labels})
    if not out and rows and required:
        hint = first_error or f"every row was cut before its reply at max_seq_len={cfg.max_seq_len}"
        raise ConfigError("max_seq_len" if not first_error else "dataset_path", hint)
    return out, stats


# --- the tokenization cache -----------------------------------------------------------------

TOKEN_CACHE_KEEP = 8  # newest cached tokenizations kept; older ones are deleted
_TOKENIZER_FILES = ("tokenizer*", "*.model", "vocab*", "merges*", "special_tokens_map.json")


def _token_cache_dir() -> Path:
    from studio import paths

    return paths.data_dir() / "cache" / "tokens"


def token_cache_key(tok: Any, run: PreparedRun) -> str:
    """What the tokens of a run depend on, hashed: the rows themselves (so the dataset file's
    content, its format and the split), the tokenizer's files and chat template, max length,
    the loss mask setting, and the code that tokenizes. Any change gives a new key, so a
    cached tokenization is never stale; an unchanged Start skips tokenizing."""
    import hashlib
    import json

    from studio.data import chat_format
    from studio.data.chat_format import template_hash

    h = hashlib.sha256()
    for part in (
        json.dumps([run.train_rows, run.val_rows], ensure_ascii=False, sort_keys=True),
        f"{run.cfg.max_seq_len}|{run.cfg.assistant_only_loss}|{template_hash(tok)}",
        type(tok).__name__,
    ):
        h.update(part.encode("utf-8"))
    name = str(getattr(tok, "name_or_path", "") or "")
    folder = Path(name)
    files = sorted({f for p in _TOKENIZER_FILES for f in folder.glob(p)}) if name else []
    for f in [*files, Path(chat_format.__file__), Path(__file__)]:
        with contextlib.suppress(OSError):
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:32]


def load_token_cache(key: str) -> tuple | None:
    """(train_tok, train_stats, val_tok, val_stats) cached under `key`, or None."""
    import json

    path = _token_cache_dir() / f"{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data["train"], data["train_stats"], data["val"], data["val_stats"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or torn: tokenize again
        return None


def save_token_cache(key: str, value: tuple) -> bool:
    """Cache a tokenization (atomic write); keeps the newest TOKEN_CACHE_KEEP. Best effort:
    a full disk costs the next Start its tokenizing, never the run. Returns whether it wrote.

    Under `accelerate launch` rank 0 alone writes: every rank tokenizes the same rows, and N
    of them writing one file and pruning the same folder at once would only race. The other
    ranks read the cache (`load_token_cache`) and never write it."""
    import json

    if not distributed.is_main():
        return False
    train, train_stats, val, val_stats = value
    folder = _token_cache_dir()
    data = {"train": train, "train_stats": train_stats, "val": val, "val_stats": val_stats}
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        runs.atomic_write_text(folder / f"{key}.json", json.dumps(data, separators=(",", ":")))
        old = sorted(folder.glob("*.json"), key=lambda f: f.stat().st_mtime)[:-TOKEN_CACHE_KEEP]
        for f in old:
            f.unlink(missing_ok=True)
        return True
    return False


# --- the run's tokens: in the job's thread, inside the run's record ------------------------


def tokenize_run(run: PreparedRun, say: Callable[[str], None]) -> Tokens:
    """The base model resolved, its tokenizer loaded, the rows tokenized once (or the cached
    tokens of an unchanged Start reused); what was kept, cut and dropped goes into the
    metadata. `say` is the run's message line (log.jsonl and the Train tab)."""
    for note in run.meta.get("dataset", {}).get("notes", []):
        say(note)  # what the Dataset tab's summary says, in the log and on the CLI too
    base = _resolve_base_model(run, say)
    tok = _load_tokenizer(run, base.path)
    if run.cfg.objective == "dpo":  # TRL's DPOTrainer tokenizes the pairs itself
        return _preference_tokens(run, base, tok, say)
    t0 = time.time()
    train, val = _tokenize(run, tok, say)
    run.meta.setdefault("timings", {})["tokenize_s"] = round(time.time() - t0, 2)
    return Tokens(base, tok, train, val)


def _preference_tokens(
    run: PreparedRun, base: ResolvedModel, tok: Any, say: Callable[[str], None]
) -> Tokens:
    """A DPO run's rows as they are: TRL tokenizes prompt / chosen / rejected with the same
    chat template (`studio.train.dpo`); the counts go into the metadata like SFT's."""
    run.meta["dataset"].update(train_pairs=len(run.train_rows), val_pairs=len(run.val_rows))
    say(
        f"{len(run.train_rows)} train / {len(run.val_rows)} held-out preference pairs"
        " (chosen and rejected answers to the same prompt)"
    )
    return Tokens(base, tok, run.train_rows, run.val_rows)


def _resolve_base_model(run: PreparedRun, say: Callable[[str], None]) -> ResolvedModel:
    """The base model on disk (fetched or converted if needed), recorded in the metadata."""
    from studio.models.loader import resolve_model

    meta = run.meta
    resolved = resolve_model(run.cfg.base_model, lambda m, f: say(f"[model {f:.0%}] {m}"))
    before = (meta.get("base_model") or {}).get("revision")
    if run.resume_from and before and before != resolved.revision:
        say(
            f"WARNING: the base model changed since the run began ({before} -> {resolved.revision})"
        )
    meta["base_model"] = {
        "name": resolved.name,
        "path": str(resolved.path),
        "source": resolved.source,
        "revision": resolved.revision,
    }
    return resolved


def _load_tokenizer(run: PreparedRun, path: Path) -> Any:
    """The base model's tokenizer; its chat template is recorded beside the adapter."""
    from studio.data.chat_format import template_hash
    from studio.models.loader import load_tokenizer

    tok = load_tokenizer(path)
    run.meta["chat_template"] = tok.chat_template
    run.meta["template_hash"] = template_hash(tok)
    if distributed.is_main():  # under `accelerate launch`, rank 0 alone writes the run
        runs.atomic_write_text(run.run_dir / "chat_template.jinja", tok.chat_template or "")
    return tok


def _tokenize(
    run: PreparedRun, tok: Any, say: Callable[[str], None]
) -> tuple[list[dict], list[dict]]:
    """Tokenize the train and validation rows, or reuse the cached tokens of the same rows."""
    n_rows = len(run.train_rows) + len(run.val_rows)
    key = token_cache_key(tok, run)
    cached = load_token_cache(key)
    if cached is None:
        say(f"Tokenizing {n_rows} rows")
        train_tok, train_stats = tokenize_rows(tok, run.train_rows, run.cfg)
        runs.kill_point("tokenize")
        val_tok, val_stats = tokenize_rows(tok, run.val_rows, run.cfg, required=False)
        save_token_cache(key, (train_tok, train_stats, val_tok, val_stats))
    else:
        say(f"Tokenized {n_rows} rows before (same data and settings): reusing them")
        runs.kill_point("tokenize")
        train_tok, train_stats, val_tok, val_stats = cached
    run.meta["dataset"].update(
        train_examples=len(train_tok),
        val_examples=len(val_tok),
        dropped_rows=train_stats["dropped"] + val_stats["dropped"],
        truncated_rows=train_stats["truncated"] + val_stats["truncated"],
        train_tokens=train_stats["tokens"],
        trained_tokens=train_stats["trained_tokens"],
    )
    say(
        f"Tokenized {len(train_tok)} train / {len(val_tok)} validation conversations "
        f"({train_stats['trained_tokens']} trained tokens; "
        f"{train_stats['truncated']} truncated, {train_stats['dropped']} dropped)"
    )
    return train_tok, val_tok


# --- hardware -----------------------------------------------------------------------------


def resolve_device(cfg: RunConfig) -> tuple[str, str]:
    """The device to train on and why; refuses cuda when no GPU is visible."""
    import torch

    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ConfigError(
            "device",
            f"no CUDA GPU is visible to PyTorch ({torch.__version__}, {build}): pick 'cpu' or"
            " 'auto', or install the CUDA build of torch",
        )
    if cfg.device == "cpu":
        return "cpu", "cpu: chosen in the settings"
    if has_cuda:
        count = torch.cuda.device_count()
        if cfg.gpu_index >= count:
            raise ConfigError("gpu_index", f"GPU {cfg.gpu_index} does not exist ({count} found)")
        return "cuda", f"cuda: GPU {cfg.gpu_index}, {torch.cuda.get_device_name(cfg.gpu_index)}"
    return "cpu", "cpu: no CUDA GPU visible to PyTorch"


def hardware_preset(cfg: RunConfig) -> Any | None:
    """The Hardware tab's preset named in the config (`studio.hardware.presets`), or None."""
    if not cfg.preset:
        return None
    try:
        from studio.hardware.presets import load_presets

        return load_presets().get(cfg.preset)
    except Exception:  # no presets module, or an unknown/broken preset: no estimate, no crash
        return None


def expected_device(cfg: RunConfig) -> str:
    """The device the user meant: set explicitly, or implied by the hardware preset."""
    if cfg.device != "auto":
        return cfg.device
    preset = hardware_preset(cfg)
    if preset is not None:
        return "cuda" if getattr(preset, "kind", "") == "cuda" else "cpu"
    return "any"


def board_power(cfg: RunConfig, device: str) -> tuple[float, str]:
    """Watts drawn while training (the preset's board power) and where the figure comes from."""
    preset = hardware_preset(cfg)
    watts = getattr(preset, "board_power_w", None)
    if watts:
        return float(watts), f"{watts:g} W board power of preset '{cfg.preset}'"
    if device == "cpu":
        return 0.0, "0 W: no board power known for CPU training (pick a hardware preset)"
    return 0.0, "0 W: pick a hardware preset to estimate electricity"


def hardware_info(device: str, gpu_index: int = 0) -> dict[str, Any]:
    """The machine a run trained on, for its metadata: the card it trains on."""
    import psutil
    import torch

    info: dict[str, Any] = {
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        from studio.hardware.detect import card_info

        info.update(card_info(gpu_index if device == "cuda" else 0))
    return info


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a run, for its metadata."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"lora-studio": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# --- a new run, or a resumed one ------------------------------------------------------------


def prepare_run(cfg: RunConfig) -> PreparedRun:
    """Everything that can refuse a run before a model loads; then create its folder."""
    cfg = cfg.replace(
        dataset_path=str(Path(cfg.dataset_path).expanduser().resolve()) if cfg.dataset_path else ""
    )
    device, reason, report = _checked_rows(cfg)
    rows = training_rows(report)
    train_rows, val_rows = split_rows(rows, cfg.val_fraction, cfg.seed)
    meta = _new_run_meta(cfg, device, reason, len(rows), len(train_rows), len(val_rows))
    meta["dataset"]["notes"] = list(report.notes)  # rows read but not trained as written
    run_dir = runs.new_run_dir(cfg.run_name)
    meta["run_dir"] = str(run_dir)
    runs.mark_live(run_dir)  # released by the run's record (`loop.recording`), which must follow
    try:
        runs.atomic_write_text(run_dir / runs.RUN_YAML, cfg.to_yaml())
        runs.write_metadata(run_dir, meta)
    except BaseException:
        runs.mark_done(run_dir)
        raise
    return _prepared(cfg, run_dir, train_rows, val_rows, device, reason, None, meta)


def _new_run_meta(
    cfg: RunConfig, device: str, reason: str, n_rows: int, n_train: int, n_val: int
) -> dict[str, Any]:
    """training_metadata.json as a new run starts: settings, data, versions, hardware."""
    path = dataset_file(cfg)
    return {
        "status": "running",
        "created": now_iso(),
        "updated": now_iso(),
        "pid": os.getpid(),
        "host": platform.node(),
        "run_name": cfg.run_name,
        "run_dir": "",
        "base_model": {"name": cfg.base_model},
        "dataset": {
            "path": str(path),
            "format": cfg.dataset_format,
            "sha256": file_sha256(path),
            "rows": n_rows,
            "train_rows": n_train,
            "val_rows": n_val,
        },
        "settings": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": package_versions(),
        "hardware": hardware_info(device, cfg.gpu_index),
        "device": {"used": device, "reason": reason, "expected": expected_device(cfg)},
        "adapter_dir": runs.ADAPTER,
        "objective": cfg.objective,
        # What the adapter starts from: a fresh LoRA on the base, or a finished run's adapter.
        "starts_from": _start_of(cfg),
        "error": None,
    }


def _start_of(cfg: RunConfig) -> dict[str, Any]:
    """Where a run's adapter starts, for its metadata: the base, or an earlier run."""
    if not cfg.init_adapter:
        return {"kind": "base", "base_model": cfg.base_model}
    folder = Path(cfg.init_adapter).expanduser().resolve()
    earlier = runs.read_metadata(folder) if (folder / runs.METADATA).is_file() else {}
    base = (earlier.get("base_model") or {}).get("name")
    if base and base != cfg.base_model:
        raise ConfigError(
            "init_adapter",
            f"{folder.name} trained an adapter of {base}, not of {cfg.base_model}: pick that"
            " base model, or a run of this one",
        )
    return {
        "kind": "run",
        "run_dir": str(folder),
        "run_name": earlier.get("run_name", folder.name),
        "objective": earlier.get("objective", "sft"),
    }


def prepare_resume(run_dir: str | Path) -> PreparedRun:
    """Check a run can continue from its last complete checkpoint, with the same data."""
    run_dir = Path(run_dir).resolve()
    meta, checkpoint = _resumable(run_dir)
    cfg = RunConfig.load(run_dir / runs.RUN_YAML)
    device, reason, report = _checked_rows(cfg)
    path = dataset_file(cfg)
    rows = training_rows(report)
    recorded = (meta.get("dataset") or {}).get("sha256")
    if recorded and recorded != file_sha256(path):
        raise ConfigError(
            "dataset_path", f"{path} changed since the run began; Resume needs the same data"
        )
    train_rows, val_rows = split_rows(rows, cfg.val_fraction, cfg.seed)
    step = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0
    meta.update(status="running", updated=now_iso(), pid=os.getpid(), error=None, advice=None)
    meta.setdefault("resumes", []).append({"at": now_iso(), "from_step": step})
    meta["device"] = {**(meta.get("device") or {}), "used": device, "reason": reason}
    runs.mark_live(run_dir)  # released by the run's record (`loop.recording`), which must follow
    try:
        runs.write_metadata(run_dir, meta)
        with contextlib.closing(runs.open_log(run_dir)) as fh:
            runs.append_log(fh, {"event": "resumed", "from_step": step, "time": time.time()})
    except BaseException:
        runs.mark_done(run_dir)
        raise
    return _prepared(cfg, run_dir, train_rows, val_rows, device, reason, checkpoint, meta)


def _resumable(run_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """The run's metadata and last complete checkpoint (None: none yet), or why it cannot be
    resumed."""
    if not (run_dir / runs.RUN_YAML).is_file():
        raise ConfigError("run_dir", f"{run_dir} is not a run folder (no {runs.RUN_YAML})")
    meta = runs.read_metadata(run_dir)
    if runs.is_live(run_dir, meta):
        raise ConfigError("run_dir", f"{run_dir.name} is still training")
    runs.recover_adapter(run_dir)  # a crash between the renames that publish adapter/
    if meta.get("status") == "completed":
        raise ConfigError("run_dir", f"{run_dir.name} already completed; start a new run instead")
    # None: killed before its first complete checkpoint (while tokenizing, in step 1), so it
    # goes on from step 0 in its own folder rather than being left for the user to redo.
    return meta, runs.latest_checkpoint(run_dir)


def _prepared(
    cfg: RunConfig,
    run_dir: Path,
    train_rows: list[dict[str, Any]],
    val_rows: list[dict[str, Any]],
    device: str,
    reason: str,
    resume_from: Path | None,
    meta: dict[str, Any],
) -> PreparedRun:
    """The PreparedRun, with the settings' intended device and board power worked out."""
    watts, _ = board_power(cfg, device)
    return PreparedRun(
        cfg, run_dir, train_rows, val_rows, device, reason, resume_from, meta,
        expected_device=expected_device(cfg), power_w=watts,
    )  # fmt: skip
