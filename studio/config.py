"""The run config: every setting of a training run, saved as `run.yaml` in its folder.

The UI fills it, `python -m studio.train RUN.yaml` runs it headless, and the Hardware tab's
presets and VRAM estimate speak the same field names.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from studio import compat

# The embedded SmolLM2 (`studio.models.loader` ships it): a run without a model picked uses it.
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
METHODS = ("lora", "qlora")  # LoRA on a 16-bit base, or QLoRA on an NF4 4-bit base
# What the adapter learns: SFT imitates answers; DPO prefers `chosen` over `rejected` answers
# (preference rows). Apart from `method`, so QLoRA + DPO is one setting of each.
OBJECTIVES = ("sft", "dpo")
TARGETS = ("qv", "attention", "attention_mlp", "all_linear")
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit")
DEVICES = ("auto", "cuda", "cpu")
# Long-context options (studio/hardware/longctx.py): auto turns one on when the fit check
# says "tight" or "won't fit" and this machine can run it; on and off override.
SWITCHES = ("auto", "on", "off")
# Characters, after NFC. Windows opens paths under 260 characters, and the deepest file a run
# writes (a second export's GGUF, under C:\Users\<user>\.lora-studio\runs\) holds the name
# twice: with a 24-character user name, 40 leaves about 30 characters to spare.
RUN_NAME_MAX = 40
# The folder name is the run name plus "-YYYYmmdd-HHMMSS-N"; most file systems allow 255 bytes.
_RUN_NAME_MAX_BYTES = 200
_RUN_NAME_PUNCT = frozenset("._-")


class ConfigError(ValueError):
    """A setting is invalid; `field` names it so the UI can point at it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class RunConfig:
    """All settings of one run. Defaults give a short CPU-friendly LoRA run."""

    run_name: str = "run"  # folder prefix: runs/<run_name>-<timestamp>/
    base_model: str = DEFAULT_MODEL  # local folder, hub id, or the embedded default
    trust_remote_code: bool = False  # runs code from the model repo: off unless ticked
    dataset_path: str = ""  # empty: the bundled sample dataset
    dataset_format: str = "auto"  # auto, alpaca, sharegpt, messages, preference
    val_fraction: float = 0.1  # share of rows held out for evaluation
    seed: int = 42

    # The defaults are the CPU preset's recipe for the embedded 135M model on the bundled
    # sample (presets/cpu.yaml; studio/train/plan.py sizes it for other data): r 8 on q/v at
    # lr 2e-4 taught that sample nothing, r 16 on every linear layer at 1e-3 teaches its format.
    method: str = "lora"  # lora (16-bit base) or qlora (4-bit NF4 base)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: str = "all_linear"  # qv, attention, attention_mlp, all_linear

    # Preference tuning (README "Preference tuning"): `dpo` trains on prompt/chosen/rejected
    # rows with TRL's DPOTrainer; the reference is the starting model with this run's adapter
    # off, so no second copy of the model is loaded.
    objective: str = "sft"  # sft or dpo
    dpo_beta: float = 0.1  # how far DPO may move from the reference (higher: stays closer)
    # Weight of an SFT loss on the chosen answers added to DPO's (RPO, Pang et al. 2024); 0:
    # plain DPO. DPO alone may push rejected answers down and chosen ones with them. 1.0 is
    # the CPU preset's value for the embedded model, like the other defaults here: at lr 1e-3
    # plain DPO ranked every held-out pair right and answered in runaway nested JSON.
    dpo_sft_weight: float = 1.0
    # A finished SFT run's folder to continue from (its adapter is trained further and, for
    # DPO, is also the reference); empty: a fresh adapter on the base model.
    init_adapter: str = ""

    max_seq_len: int = 512  # longer rows are truncated
    batch_size: int = 4  # per device
    grad_accum: int = 1  # effective batch = batch_size * grad_accum
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw_torch"
    gradient_checkpointing: bool = False
    # TRL's activation offloading: checkpointed layer inputs wait in host RAM (CUDA only)
    activation_offloading: str = "auto"
    # Liger's Triton kernels for RMSNorm/SwiGLU/RoPE (`use_liger_kernel`; CUDA with Triton)
    liger_kernels: str = "auto"
    # The MLP in shards, recomputed in backward (`studio.train.tiled_mlp`; any device, 1 GPU)
    tiled_mlp: str = "auto"
    assistant_only_loss: bool = True  # loss on assistant turns (with their end token) only
    packing: bool = False  # False: padding-free batches of whole rows

    logging_steps: int = 1
    eval_steps: int = 0  # 0: evaluate about 5 times per run
    save_steps: int = 0  # checkpoint every N steps; 0: about 4 per run
    device: str = "auto"  # auto, cuda, cpu
    gpu_index: int = 0  # which CUDA card trains when there are several (the Hardware tab's pick)

    preset: str = ""  # hardware preset name (board power for the electricity estimate)
    price_per_kwh: float = 0.30  # electricity price, in the user's currency
    allow_pii: bool = False  # confirmed: train although the PII scan found something
    # Also log to Weights & Biases; used only when wandb is installed and set up (TensorBoard
    # event files are always written into the run folder).
    wandb: bool = False

    def validate(self) -> RunConfig:
        """Raise ConfigError naming the first bad field; return self when all is well."""
        name = clean_run_name(self.run_name)
        if name is not None and compat.reserved_name(name):
            raise ConfigError(
                "run_name",
                f"Windows reserves {name!r} for a device (con, prn, aux, nul, com1-9, lpt1-9, with"
                " or without an extension) and cannot create such a folder: pick another name",
            )
        if name is None:
            raise ConfigError(
                "run_name",
                f"use 1-{RUN_NAME_MAX} letters (any script), digits, '.', '-' or '_'"
                " (no spaces or slashes)",
            )
        self.run_name = name
        if not str(self.base_model).strip():
            raise ConfigError("base_model", "name a model folder or hub id")
        if self.dataset_format not in ("auto", "alpaca", "sharegpt", "messages", "preference"):
            raise ConfigError(
                "dataset_format", "use auto, alpaca, sharegpt, messages or preference"
            )
        if self.dataset_path and not Path(self.dataset_path).expanduser().is_file():
            raise ConfigError("dataset_path", f"no such file: {self.dataset_path}")
        _check(self.method in METHODS, "method", f"use one of {', '.join(METHODS)}")
        _check(self.objective in OBJECTIVES, "objective", "use sft or dpo (preference rows)")
        _check(0.0 < self.dpo_beta <= 10.0, "dpo_beta", "use a small positive value (0.1 is usual)")
        _check(0.0 <= self.dpo_sft_weight <= 10.0, "dpo_sft_weight", "use 0 (plain DPO) to 10")
        if self.init_adapter and not (Path(self.init_adapter).expanduser() / "adapter").is_dir():
            raise ConfigError(
                "init_adapter",
                f"{self.init_adapter} holds no adapter/ folder: name a finished run's folder",
            )
        _check(self.target_modules in TARGETS, "target_modules", f"use one of {', '.join(TARGETS)}")
        _check(self.optimizer in OPTIMIZERS, "optimizer", f"use one of {', '.join(OPTIMIZERS)}")
        _check(self.device in DEVICES, "device", f"use one of {', '.join(DEVICES)}")
        for name in ("activation_offloading", "liger_kernels", "tiled_mlp"):
            _check(getattr(self, name) in SWITCHES, name, f"use one of {', '.join(SWITCHES)}")
        _check(self.gpu_index >= 0, "gpu_index", "use 0 for the first GPU, 1 for the second...")
        _check(0.0 <= self.val_fraction < 0.5, "val_fraction", "use 0 to 0.5 (0.1 is usual)")
        _check(1 <= self.lora_r <= 1024, "lora_r", "use 1 to 1024 (8-64 is usual)")
        _check(self.lora_alpha >= 1, "lora_alpha", "must be at least 1 (often 2 x r)")
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "use 0 to 1 (0.05 is usual)")
        _check(16 <= self.max_seq_len <= 131072, "max_seq_len", "use 16 to 131072 tokens")
        _check(1 <= self.batch_size <= 1024, "batch_size", "use 1 to 1024")
        _check(1 <= self.grad_accum <= 1024, "grad_accum", "use 1 to 1024")
        _check(self.epochs > 0 or self.max_steps > 0, "epochs", "set epochs > 0 or max_steps > 0")
        _check(self.max_steps >= 0, "max_steps", "must be 0 (use epochs) or more")
        _check(0.0 < self.learning_rate < 1.0, "learning_rate", "use a small positive value")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "use 0 to 1")
        _check(self.max_grad_norm >= 0, "max_grad_norm", "must be 0 (off) or more")
        _check(self.logging_steps >= 1, "logging_steps", "must be at least 1")
        _check(self.eval_steps >= 0, "eval_steps", "must be 0 (auto) or more")
        _check(self.save_steps >= 0, "save_steps", "must be 0 (auto) or more")
        _check(self.price_per_kwh >= 0, "price_per_kwh", "must be 0 or more")
        return self

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Build from plain data, refusing unknown keys and coercing types by the defaults."""
        known = {f.name: f for f in fields(cls)}
        data = _method_shorthand(data)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(unknown[0], f"unknown setting (known: {', '.join(known)})")
        values: dict[str, Any] = {}
        for key, value in data.items():
            default = known[key].default
            values[key] = _coerce(key, value, default)
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("yaml", f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("yaml", f"{path} must hold a mapping of settings")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def _method_shorthand(data: dict[str, Any]) -> dict[str, Any]:
    """`method: dpo` (as the issue and other tools spell it) means objective dpo on LoRA;
    `method: qlora` with `objective: dpo` is QLoRA + DPO. Anything else passes unchanged."""
    if str(data.get("method", "")).strip().lower() != "dpo":
        return data
    if str(data.get("objective", "dpo")).strip().lower() != "dpo":
        raise ConfigError("method", "method: dpo contradicts objective: sft; drop one of them")
    return {**data, "method": "lora", "objective": "dpo"}


def clean_run_name(name: str | None) -> str | None:
    """The name in NFC form if it can name a run folder, else None.

    Letters, combining marks and digits of every script are allowed, so Thai vowel marks and
    Vietnamese typed in decomposed form (NFD) work; NFC makes both spellings of a name one
    folder. A name may not start with a mark (it would have nothing to sit on).
    """
    name = unicodedata.normalize("NFC", name or "")
    if not 1 <= len(name) <= RUN_NAME_MAX or len(name.encode()) > _RUN_NAME_MAX_BYTES:
        return None
    if unicodedata.category(name[0]).startswith("M"):
        return None
    for ch in name:
        if ch not in _RUN_NAME_PUNCT and unicodedata.category(ch)[0] not in "LMN":
            return None
    return name


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(field, message)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """YAML and UI widgets give strings or floats where ints are meant; convert or say so."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in {"1", "true", "yes", "on"}
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value} is not a whole number")
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            return "" if value is None else str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, f"cannot read {value!r}: {exc}") from exc
    return value
