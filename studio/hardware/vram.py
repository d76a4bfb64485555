"""Estimate the peak GPU memory of a LoRA/QLoRA run from the model's config.json alone.

No weights are loaded: the shapes in config.json (hidden size, layers, heads, KV heads,
intermediate size, vocab, tied embeddings; for the listed models, reference_models.yaml next
to this file holds them, so it works offline) plus the run settings (method, LoRA targets and
rank, batch, sequence length, gradient checkpointing, optimizer) give the peak as parts:

- base weights: 16-bit for LoRA; for QLoRA the decoder's linear layers in NF4 (0.5 byte per
  parameter plus the double-quantized block constants), embeddings, norms and lm_head 16-bit;
- LoRA: adapter weights, their gradients and the optimizer states;
- activations: what autograd keeps per token and layer for the backward pass (per-layer
  inputs only, plus one recomputed layer, with gradient checkpointing), the backward's
  transient buffers, and the attention mask of the padded batches the studio trains with;
- logits: the LM head and loss. TRL's SFTTrainer (1.x) computes the loss with a fused,
  chunked LM head that never builds the (tokens x vocab) logits; `fused_lm_head=False` gives
  the classic cost (fp32 logits plus their gradient), the largest part for small models with
  a 152k vocabulary;
- overhead: the CUDA context, cuBLAS workspace, QLoRA dequantization buffers and the
  caching allocator's slack.

The constants follow the code paths of the pinned stack (transformers 5, peft, TRL 1.x,
bitsandbytes): which tensors autograd saves, in which dtype. `python -m studio.hardware.calibrate`
(studio/tools/calibrate.py) checks them against `torch.cuda.max_memory_allocated` on a GPU.

Run: `python -m studio.hardware.vram MODEL [--method qlora --batch-size 2 --card-gb 12 ...]` prints
the estimate; `python -m studio.hardware.calibrate` runs the CUDA calibration.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from studio import compat
from studio.config import DEFAULT_MODEL, ConfigError, RunConfig

GIB = 1024**3
MIB = 1024**2

# --- Reference configs: the fields of each model's published config.json that the estimate
# needs, so the picker and the estimate work offline. They live in reference_models.yaml
# (commented data), loaded and checked once on import.
REFERENCE_FILE = Path(__file__).with_name("reference_models.yaml")
# Each field of a reference entry and its type; head_dim is optional (config.json gives it
# only where it is not hidden_size / heads).
_REFERENCE_FIELDS: dict[str, type] = {
    "model_type": str,
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int,
    "head_dim": int,
    "vocab_size": int,
    "tie_word_embeddings": bool,
    "max_position_embeddings": int,
    "rms_norm_eps": float,
    "rope_theta": float,
}
_OPTIONAL_REFERENCE_FIELDS = frozenset({"head_dim"})


def load_reference_configs(path: Path = REFERENCE_FILE) -> dict[str, dict[str, Any]]:
    """Model id -> config.json fields, from the YAML file; a bad entry names model and field.

    Checked here so that a typo in the data file fails at once, not as a wrong estimate.
    """
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a mapping of model id to config.json fields")
    return {str(name): _checked_reference(path, str(name), cfg) for name, cfg in data.items()}


def _checked_reference(path: Path, name: str, cfg: Any) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: {name}: expected a mapping of config.json fields")
    unknown = sorted(set(cfg) - set(_REFERENCE_FIELDS))
    missing = sorted(set(_REFERENCE_FIELDS) - _OPTIONAL_REFERENCE_FIELDS - set(cfg))
    if unknown or missing:
        raise ValueError(f"{path}: {name}: unknown fields {unknown}, missing fields {missing}")
    for key, value in cfg.items():
        kind = _REFERENCE_FIELDS[key]
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok or (kind is int and value <= 0):
            raise ValueError(f"{path}: {name}.{key}: expected a {kind.__name__}, not {value!r}")
    return dict(cfg)


REFERENCE_CONFIGS: dict[str, dict[str, Any]] = load_reference_configs()


# --- Constants of the estimate (bytes). Each says which code path it stands for.
NF4_BYTES = 0.5  # two 4-bit codes per byte (bitsandbytes Params4bit)
NF4_BLOCK = 64  # one absmax per 64 weights (bnb_4bit default blocksize)
NF4_DQ_BLOCK = 256  # double quantization: absmax stored as 8 bit, one fp32 scale per 256 blocks
NF4_TENSOR_CONST = 1024 + 64  # per quantized tensor: the 8-bit code table and the quant state
ADAM_8BIT_MIN_SIZE = 4096  # bitsandbytes keeps tensors smaller than this in 32-bit states
ADAM_8BIT_BLOCK = 256  # blockwise 8-bit states: one fp32 absmax per 256 values and state
CUDA_CONTEXT = 500 * MIB  # driver context, kernels, cuBLAS/cuDNN handles: not in torch's counters
CUBLAS_WORKSPACE = 32 * MIB  # cuBLAS workspaces come from torch's allocator
ALLOCATOR_SLACK = 0.05  # reserved but unallocated share of the per-step memory (fragmentation)
CPU_PROCESS = 1200 * MIB  # on CPU: Python, torch, transformers and the app itself in RAM
FUSED_HEAD_TOKENS = 4096  # TRL chunked log-prob: tokens per tile...
FUSED_HEAD_VOCAB = 32768  # ...and vocabulary entries per tile
BATCH_INPUT_BYTES = 40  # per token: input_ids, labels, attention and completion masks (int64)
# The studio batches rows of similar length padded to the longest (studio.train): when a row
# is shorter, transformers builds a boolean (rows x L x L) mask for SDPA.
MASK_BYTES = 1
TYPICAL_DESKTOP_USE = 512 * MIB  # used by the desktop on a card that is not measured here

TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "qv": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "attention_mlp": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    # peft's "all-linear" minus lm_head: the same seven for Llama/Qwen/Mistral decoders
    "all_linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
# Which tensor each linear layer reads: layers reading the same tensor share a saved input.
_INPUT_GROUP = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "down_in",
}
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
PART_LABELS = {
    "in_use": "Already in use",
    "base": "Base weights",
    "lora": "LoRA weights + grads + optimizer",
    "activations": "Activations",
    "logits": "Logits (LM head + loss)",
    "overhead": "CUDA context & overhead",
}
HEADROOM = 0.10  # "fits" leaves 10% of the free memory spare
# Logits per piece of the training recipe's compact head (128 MiB in fp32): the recipe cuts
# its loss into pieces of this size (`studio.train.recipe.head_loss_sum`), the estimate
# counts one piece.
HEAD_CHUNK_VALUES = 32 * 2**20
# Per rank, DDP adds gradient buckets (a second copy of the trainable gradients, fp32) and
# NCCL's communication buffers; 256 MiB is a round figure for the latter, not calibrated.
DDP_NCCL_BYTES = 256 * 2**20

# --- Long context: what TRL's activation offloading and Liger's kernels change.
# TRL's `OffloadActivations` (trl/models/activation_offloading.py) copies every tensor autograd
# saves outside a checkpointed layer, i.e. each layer's input, to pinned host RAM on a side
# stream. On the GPU stay: the forward's stash (the last 5 saved tensors, about two layers'
# inputs since rope's cos/sin are saved with each) and, in backward, the layer being
# recomputed and the next one, fetched ahead. Two layers' worth, counted here.
OFFLOAD_GPU_LAYERS = 2
# Each offloaded byte crosses PCIe twice per step (out in forward, back in backward). TRL
# overlaps the copies with compute; if they were not hidden, this is what a step would wait.
PCIE_BYTES_PER_S = 16e9  # PCIe 4.0 x16 pinned copies, about half the link's 32 GB/s peak
# Share of the RAM available now that the pinned copies may take: past it the OS swaps.
HOST_RAM_SHARE = 0.8


@dataclass(frozen=True)
class Kernels:
    """How the training stack stores things on one kind of device (bytes per value)."""

    name: str
    compute: int  # activations: bf16/fp16 autocast on CUDA, fp32 on CPU
    weights: int  # weights that are not quantized
    adapter_lora: int  # peft upcasts adapters to fp32 (autocast_adapter_dtype)...
    adapter_qlora: int  # ...and TRL casts them back to bf16 on a quantized model
    autocast: bool  # matmuls run in `compute` whatever the weight dtype
    dropout_mask: int | None  # bool mask (CUDA's fused dropout); None: noise in the input's dtype
    head_tile_temps: int  # fp32 tile-sized temporaries of the chunked head (0 with Triton)
    context: int  # memory the process takes before any tensor (CUDA context / Python + libs)
    workspace: int  # allocator-counted scratch (cuBLAS)
    slack: float  # allocator slack as a share of the per-step memory


CUDA = Kernels("cuda", 2, 2, 4, 2, True, 1, 0, CUDA_CONTEXT, CUBLAS_WORKSPACE, ALLOCATOR_SLACK)
# On CPU, studio.train casts QLoRA adapters back to fp32 (TRL made them bf16).
CPU = Kernels("cpu", 4, 4, 4, 4, False, None, 8, CPU_PROCESS, 0, 0.0)
# A CPU with native bf16 (studio.models.precision.cpu_bf16): the CUDA recipe (bf16 base, autocast,
# bf16 QLoRA adapters) on CPU kernels. The calibration script also runs it when no GPU is at
# hand, to check the formulas' structure (not CUDA's kernels).
CPU_BF16 = Kernels("cpu-bf16", 2, 2, 4, 2, True, None, 8, CPU_PROCESS, 0, 0.0)
KERNELS = {k.name: k for k in (CUDA, CPU, CPU_BF16)}


@dataclass(frozen=True)
class Options:
    """The long-context options a run trains with (`studio.hardware.longctx` chooses them)."""

    offload: bool = False  # TRL's activation offloading: saved layer inputs in host RAM
    liger: bool = False  # Liger's RMSNorm/SwiGLU/RoPE kernels (`use_liger_kernel`)
    tiled_mlp: bool = False  # the MLP in shards, recomputed in backward (`studio.train.tiled_mlp`)


class ModelShapeError(ValueError):
    """The model's shape cannot be read (no config.json, or not a decoder the estimate knows)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only transformer that decide its training memory."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool = False
    mlp_bias: bool = False
    source: str = ""

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        """Weights of all decoder linear layers (what QLoRA stores in NF4)."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        return per_layer * self.num_layers

    @property
    def bias_params(self) -> int:
        per_layer = (self.q_dim + 2 * self.kv_dim) * self.qkv_bias
        per_layer += (2 * self.intermediate_size + self.hidden_size) * self.mlp_bias
        return per_layer * self.num_layers

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """0 when the head shares the embedding matrix."""
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def n_params(self) -> int:
        return (
            self.linear_params
            + self.bias_params
            + self.embed_params
            + self.lm_head_params
            + self.norm_params
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["n_params"] = self.n_params
        return data


def format_params(n: int) -> str:
    """135M, 1.5B, 7.6B: how model sizes are usually written."""
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.0f}M"


def shape_from_config(config: Mapping[str, Any], name: str = "", source: str = "") -> ModelShape:
    """Read a ModelShape from a config.json mapping (Llama-style decoders: Llama, Qwen2, ...)."""
    cfg = dict(config)
    if isinstance(cfg.get("text_config"), Mapping):  # multimodal wrappers keep the LM inside
        cfg = {**cfg, **cfg["text_config"]}
    if cfg.get("num_local_experts") or cfg.get("num_experts"):
        raise ModelShapeError(
            f"{name or 'this model'} is a mixture-of-experts model; the estimate only knows dense"
            " decoders (Llama, Qwen2, Mistral, SmolLM...)"
        )
    missing = [
        key
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if not cfg.get(key)
    ]
    if not cfg.get("intermediate_size"):
        missing.append("intermediate_size")
    if missing:
        raise ModelShapeError(
            f"{source or name}: config lacks {', '.join(missing)}; the estimate knows Llama-style"
            " decoders (Llama, Qwen2, Mistral, SmolLM...)"
        )
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    model_type = str(cfg.get("model_type", "")) or "unknown"
    qkv_bias = bool(cfg.get("attention_bias", model_type in {"qwen2", "qwen2_5"}))
    return ModelShape(
        name=name or str(cfg.get("_name_or_path", "")) or model_type,
        model_type=model_type,
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=int(cfg["vocab_size"]),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        qkv_bias=qkv_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        source=source,
    )


def _reference_key(name: str) -> str | None:
    """Match a hub id or bare model name to a reference config, ignoring case and -Instruct;
    a pre-quantized 4-bit copy (`*-bnb-4bit`) has its original's shape."""
    from studio.models.catalog import original_of

    name = original_of(name) or name

    def norm(text: str) -> str:
        base = text.strip().lower().rsplit("/", 1)[-1]
        return base.removesuffix("-instruct")

    wanted = norm(name)
    for key in REFERENCE_CONFIGS:
        if key.lower() == name.strip().lower() or norm(key) == wanted:
            return key
    return None


def known_models() -> list[tuple[str, ModelShape]]:
    """The built-in reference models, smallest first, the default model first of all."""
    shapes = [
        (key, shape_from_config(cfg, key, "built-in reference config"))
        for key, cfg in REFERENCE_CONFIGS.items()
    ]
    shapes.sort(key=lambda item: (item[0] != DEFAULT_MODEL, item[1].n_params))
    return shapes


def model_shape(name_or_path: str) -> ModelShape:
    """The shape of a model: local folder's config.json, the hub cache, or a reference config.

    Never touches the network, so the Hardware tab answers at once on an offline machine.
    """
    name = (name_or_path or DEFAULT_MODEL).strip()
    local = Path(name).expanduser()
    if local.is_dir():
        config_path = local / "config.json"
        if not config_path.is_file():
            raise ModelShapeError(f"{local} has no config.json: is it a model folder?")
        return _shape_from_file(config_path, name)
    if local.suffix == ".json" and local.is_file():
        return _shape_from_file(local, name)
    key = _reference_key(name)
    if key is not None:
        return shape_from_config(REFERENCE_CONFIGS[key], key, "built-in reference config")
    if name.count("/") == 1:
        cached = _hub_cached_config(name)
        if cached is not None:
            return _shape_from_file(cached, name)
    raise ModelShapeError(
        f"no config.json for '{name}' on this machine: pick a listed model, give a local model"
        " folder, or download the model once (the estimate reads only its config.json)"
    )


def _shape_from_file(path: Path, name: str) -> ModelShape:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelShapeError(f"{path}: cannot read it as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelShapeError(f"{path}: expected a JSON object")
    return shape_from_config(data, name, f"config.json at {path}")


def _hub_cached_config(repo_id: str) -> Path | None:
    """config.json from the local Hugging Face cache, without any network call."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    return Path(found) if isinstance(found, str) else None


# --------------------------------------------------------------------------- the estimate


@dataclass
class VramPart:
    key: str
    label: str
    bytes: int
    detail: str = ""

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class VramEstimate:
    """Peak memory of one training step, in parts, against the memory that is free for it."""

    model: str
    n_params: int
    settings: dict[str, Any]
    device: str  # "cuda" or "cpu" (then the memory is system RAM)
    parts: list[VramPart]  # without "in_use"
    capacity_bytes: int | None  # the card's memory (or RAM); None: unknown
    in_use_bytes: int  # already used by the desktop and other programs
    allocated_bytes: int  # what torch.cuda.max_memory_allocated should show at the peak
    trainable_params: int
    tokens_per_step: int
    notes: list[str] = field(default_factory=list)
    # Long context: the options the estimate assumed, and the host RAM offloading pins.
    activation_offloading: bool = False
    liger_kernels: bool = False
    tiled_mlp: bool = False
    host_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def available_bytes(self) -> int | None:
        if self.capacity_bytes is None:
            return None
        return max(0, self.capacity_bytes - self.in_use_bytes)

    @property
    def verdict(self) -> str:
        """fits (10% spare), tight (fits without the spare) or won't fit; unknown without a card."""
        return verdict_for(self.total_bytes, self.available_bytes)

    def part(self, key: str) -> int:
        for p in self.parts:
            if p.key == key:
                return p.bytes
        raise KeyError(key)

    def summary(self) -> str:
        peak = f"{self.total_bytes / GIB:.1f} GiB"
        if self.available_bytes is None:
            return f"Estimated peak {peak} (no memory size to compare with)"
        return f"Estimated peak {peak} of {self.available_bytes / GIB:.1f} GiB free: {self.verdict}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "n_params": self.n_params,
            "settings": dict(self.settings),
            "device": self.device,
            "parts": [asdict(p) for p in self.parts],
            "total_bytes": self.total_bytes,
            "capacity_bytes": self.capacity_bytes,
            "in_use_bytes": self.in_use_bytes,
            "available_bytes": self.available_bytes,
            "allocated_bytes": self.allocated_bytes,
            "verdict": self.verdict,
            "trainable_params": self.trainable_params,
            "tokens_per_step": self.tokens_per_step,
            "notes": list(self.notes),
            "activation_offloading": self.activation_offloading,
            "liger_kernels": self.liger_kernels,
            "tiled_mlp": self.tiled_mlp,
            "host_bytes": self.host_bytes,
        }


def verdict_for(total_bytes: int, available_bytes: int | None, headroom: float = HEADROOM) -> str:
    if available_bytes is None:
        return "unknown"
    if total_bytes <= (1.0 - headroom) * available_bytes:
        return "fits"
    if total_bytes <= available_bytes:
        return "tight"
    return "won't fit"


def ddp_per_gpu(
    single_gpu_bytes: int, trainable_params: int, gpus: list[dict[str, Any]]
) -> dict[str, Any]:
    """The memory each card needs when all of `gpus` train one run with DDP, and the verdict
    on the card with the least free memory. Each rank holds the whole model, its optimizer and
    its own batch (the one-card estimate at the same per-device batch), plus DDP's gradient
    buckets and NCCL buffers; the effective batch grows with the cards, the memory per card
    does not.

    The card judged is the one with the least free memory, not the smallest: the ranks are
    other processes, so what this app holds on a card (its CUDA context, a chat model) stays
    in use there while they train."""
    per_gpu = single_gpu_bytes + 4 * trainable_params + DDP_NCCL_BYTES

    def free_on(gpu: dict[str, Any]) -> int:
        free = gpu.get("free_bytes")
        return int(free if free is not None else gpu["total_bytes"])

    tightest = min(gpus, key=free_on)
    available = free_on(tightest)
    return {
        "gpus": len(gpus),
        "per_gpu_bytes": int(per_gpu),
        "tightest": f"GPU {tightest['index']}: {tightest['name']}",
        "available_bytes": available,
        "verdict": verdict_for(int(per_gpu), available),
    }


_SETTING_FIELDS = (
    "method",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "max_seq_len",
    "batch_size",
    "grad_accum",
    "gradient_checkpointing",
    "optimizer",
    "objective",  # DPO: chosen and rejected in one batch, plus a reference forward (`_dpo`)
)


def run_settings(settings: RunConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The memory-relevant RunConfig fields, type-checked (ConfigError names a bad field)."""
    if isinstance(settings, RunConfig):
        cfg = settings
    else:
        given = {k: v for k, v in settings.items() if k in _SETTING_FIELDS and v is not None}
        cfg = RunConfig.from_dict(given)
    cfg.validate()
    return {name: getattr(cfg, name) for name in _SETTING_FIELDS}


def lora_param_count(shape: ModelShape, target_modules: str, r: int) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted linear layer."""
    shapes = shape.linear_shapes()
    per_layer = sum(r * (shapes[m][0] + shapes[m][1]) for m in TARGET_MODULES[target_modules])
    return per_layer * shape.num_layers


def nf4_bytes(n_params: int, n_tensors: int, double_quant: bool = True) -> float:
    """bitsandbytes NF4 storage: packed codes plus the per-block constants."""
    blocks = n_params / NF4_BLOCK
    constants = blocks * 1 + (blocks / NF4_DQ_BLOCK) * 4 if double_quant else blocks * 4
    return n_params * NF4_BYTES + constants + n_tensors * NF4_TENSOR_CONST


def optimizer_bytes(shape: ModelShape, s: dict[str, Any], param_bytes: int) -> int:
    """AdamW keeps two states per trainable value; the 8-bit ones store them blockwise."""
    r = s["lora_r"]
    shapes = shape.linear_shapes()
    total = 0.0
    for module in TARGET_MODULES[s["target_modules"]]:
        d_in, d_out = shapes[module]
        for numel in (r * d_in, r * d_out):  # lora_A, lora_B
            if s["optimizer"] == "adamw_torch":
                total += 2 * numel * param_bytes  # states in the parameter's dtype
            elif numel < ADAM_8BIT_MIN_SIZE:
                total += 2 * numel * 4
            else:
                total += 2 * numel + 2 * 4 * math.ceil(numel / ADAM_8BIT_BLOCK)
    return int(total * shape.num_layers)


def _lora_saved_per_token(
    shape: ModelShape, s: dict[str, Any], k: Kernels, adapter: int, modules: tuple[str, ...] = ()
) -> float:
    """Bytes per token one layer's LoRA branches keep for backward.

    peft runs `lora_B(lora_A(dropout(x)))` after casting x to the adapter dtype: lora_A keeps
    its input (in the autocast dtype under autocast). With dropout each module keeps its own
    dropped-out copy and the mask (CUDA: 1-byte bool; CPU: a noise tensor in x's dtype);
    without dropout or cast, the modules reading the same tensor share it. `modules`: only
    these of the run's targets (all of them when empty).
    """
    shapes = shape.linear_shapes()
    dropout = s["lora_dropout"] > 0
    cast = adapter != k.compute
    kept = k.compute if k.autocast else adapter  # dtype of the copy lora_A keeps
    mask = k.dropout_mask if k.dropout_mask is not None else adapter
    total = 0.0
    groups: set[str] = set()
    for module in TARGET_MODULES[s["target_modules"]]:
        if modules and module not in modules:
            continue
        d_in = shapes[module][0]
        if cast or dropout:
            total += kept * d_in + (mask * d_in if dropout else 0)
        elif _INPUT_GROUP[module] not in groups:
            groups.add(_INPUT_GROUP[module])
            total += k.compute * d_in
        total += k.compute * s["lora_r"]  # lora_A's output, kept by lora_B
    return total


def layer_saved_per_token(
    shape: ModelShape,
    s: dict[str, Any],
    k: Kernels,
    adapter: int,
    liger: bool = False,
    tiled: bool = False,
) -> float:
    """Bytes per token that one decoder layer keeps for backward (without checkpointing).

    Frozen base linears keep nothing (autograd saves a matmul input only when the weight
    needs a gradient; bitsandbytes' 4-bit matmul saves no input either). RMSNorm keeps an
    fp32 copy of its input; attention (SDPA flash / memory-efficient) keeps q, k, v, its output
    and the log-sum-exp; the SwiGLU MLP keeps gate, silu(gate) and up. Liger's kernels
    (`liger`) keep less: its RMSNorm the input as it is plus one fp32 rstd per row, its
    SiLU-mul only gate and up (silu is recomputed in its backward). A tiled MLP (`tiled`)
    keeps only its input: its activations and its LoRA inputs exist one shard at a time, in
    backward (`mlp_per_token`).
    """
    c, h = k.compute, shape.hidden_size
    # With a mask (several rows), transformers repeats k/v to all heads for SDPA.
    repeat = s["batch_size"] > 1 and shape.num_kv_heads < shape.num_heads
    kv_dim = shape.q_dim if repeat else shape.kv_dim
    norms = 2 * (c * h + 4) if liger else 2 * 4 * h
    attention = c * (2 * shape.q_dim + 2 * kv_dim) + 4 * shape.num_heads
    attention += _lora_saved_per_token(shape, s, k, adapter, ATTENTION_MODULES)
    mlp = c * h if tiled else mlp_per_token(shape, s, k, adapter, liger)
    return norms + attention + mlp


def mlp_per_token(
    shape: ModelShape, s: dict[str, Any], k: Kernels, adapter: int, liger: bool = False
) -> float:
    """Bytes per token the MLP keeps for backward: gate, silu(gate) and up (Liger: gate and
    up), and its LoRA branches' inputs."""
    mlp = (2 if liger else 3) * k.compute * shape.intermediate_size
    return mlp + _lora_saved_per_token(shape, s, k, adapter, MLP_MODULES)


def _backward_transient_per_token(
    shape: ModelShape, k: Kernels, liger: bool = False, tiled: bool = False
) -> float:
    """Gradient buffers alive while one layer runs backward: the MLP's, plus fp32 norm grads.

    The MLP's peak is its SiLU-mul backward: the incoming gradient and the new gradients of
    silu(gate) and up (3 x intermediate). Liger's SiLU-mul writes its gradients into the saved
    gate and up, so the peak is earlier: down_proj's input gradient from the base and from
    LoRA, summed (2 x intermediate). A tiled MLP's backward holds the input's gradient for the
    whole sequence (its shard's own buffers are `_tiled_shard`), and the attention's backward
    then is the larger: the gradients of q, k, v and the attention output."""
    norms = 3 * 4 * shape.hidden_size
    if tiled:
        return k.compute * (2 * shape.q_dim + 2 * shape.kv_dim) + norms
    return (2 if liger else 3) * k.compute * shape.intermediate_size + norms


def _tiled_shard(
    shape: ModelShape, s: dict[str, Any], k: Kernels, adapter: int, liger: bool
) -> float:
    """Bytes of one tiled-MLP shard's backward: its activations and gradients, for the
    shard's tokens (`studio.train.tiled_mlp` cuts each row's sequence into pieces of about
    the hidden size)."""
    shard = s["batch_size"] * min(s["max_seq_len"], shape.hidden_size)
    grads = (2 if liger else 3) * k.compute * shape.intermediate_size
    return shard * (mlp_per_token(shape, s, k, adapter, liger) + grads)


def estimate(
    shape: ModelShape,
    settings: RunConfig | Mapping[str, Any],
    *,
    capacity_bytes: int | None = None,
    in_use_bytes: int = 0,
    device: str = "cuda",
    fused_lm_head: bool = True,
    compact_head: bool = False,
    offload_activations: bool = False,
    liger_kernels: bool = False,
    tiled_mlp: bool = False,
) -> VramEstimate:
    """Peak memory of training `shape` with `settings` (RunConfig field names), in parts.

    `device="cpu"` estimates RAM for a CPU run (fp32 compute, no CUDA context), "cpu-bf16"
    for a CPU with native bf16 (`studio.models.precision.cpu_bf16`), which is also the calibration
    script's CPU stand-in for the CUDA recipe. `compact_head`: the recipe's compact loss head
    on CUDA, which the recipe uses where TRL's Triton path is not (`detect.triton_ready`):
    the caller that knows the machine asks there (the estimate itself probes nothing).
    `offload_activations` and `liger_kernels`: the long-context options, on CUDA only (TRL's
    offloading needs an accelerator, Liger needs Triton); elsewhere they change nothing.
    `tiled_mlp` (plain PyTorch) counts on every device."""
    s = dpo_batch(run_settings(settings))
    if device not in KERNELS:
        raise ValueError(f"device must be one of {', '.join(KERNELS)}, not {device!r}")
    k = KERNELS[device]
    qlora = s["method"] == "qlora"
    adapter = k.adapter_qlora if qlora else k.adapter_lora
    n_lora = lora_param_count(shape, s["target_modules"], s["lora_r"])
    tokens = s["batch_size"] * s["max_seq_len"]

    base, base_detail = _base_weights(shape, qlora, k)
    lora, lora_detail = _lora_weights(shape, s, adapter, n_lora)
    opts = Options(offload_activations and k is CUDA, liger_kernels and k is CUDA, tiled_mlp)
    act, layer_transient, host, act_detail = _activations(shape, s, k, adapter, n_lora, opts)
    if compact_head and k is CUDA:
        logits, logits_detail = _compact_head(shape, k, tokens, layer_transient)
    else:
        logits, logits_detail = _lm_head(shape, k, tokens, layer_transient, fused_lm_head)
    workspace = _workspace(shape, k, qlora)
    overhead, overhead_detail = _overhead(k, workspace, act + logits + workspace)
    allocated = base + lora + act + logits + workspace
    cuda = k is CUDA
    parts = [
        VramPart("base", PART_LABELS["base"], int(base), base_detail),
        VramPart("lora", PART_LABELS["lora"], int(lora), lora_detail),
        VramPart("activations", PART_LABELS["activations"], int(act), act_detail),
        VramPart("logits", PART_LABELS["logits"], int(logits), logits_detail),
        VramPart(
            "overhead",
            PART_LABELS["overhead"] if cuda else "Process overhead",
            int(overhead),
            overhead_detail,
        ),
    ]
    if s["objective"] == "dpo":
        ref = dpo_reference(shape, k, tokens)
        parts.insert(4, ref)
        allocated += ref.bytes
    return VramEstimate(
        model=shape.name,
        n_params=shape.n_params,
        settings=s,
        device=device,
        parts=parts,
        capacity_bytes=capacity_bytes,
        in_use_bytes=int(in_use_bytes),
        allocated_bytes=int(allocated),
        trainable_params=n_lora,
        tokens_per_step=tokens,
        notes=_notes(s, k) + _option_notes(opts, host, shape),
        activation_offloading=opts.offload,
        liger_kernels=opts.liger,
        tiled_mlp=opts.tiled_mlp,
        host_bytes=int(host),
    )


def dpo_batch(s: dict[str, Any]) -> dict[str, Any]:
    """DPO's shape in the settings the estimate reads: a pair is two sequences, chosen and
    rejected in one batch; the recipe gives each step batch_size // 2 pairs (at least one,
    `studio.train.recipe.pairs_per_batch`): twice that many sequences."""
    if s.get("objective") != "dpo":
        return s
    return {**s, "batch_size": 2 * max(1, s["batch_size"] // 2)}


def dpo_reference(shape: ModelShape, k: Kernels, tokens: int) -> VramPart:
    """DPO's reference forward (the base with the adapter off, no gradient): nothing is kept
    for backward, so one layer's working buffers at a time and the hidden states of the
    batch, while the policy's activations are held for its backward."""
    working = tokens * (_backward_transient_per_token(shape, k) + 2 * shape.hidden_size * k.compute)
    detail = f"{tokens} tokens through one layer at a time, no gradient (adapter off)"
    return VramPart("reference", "DPO reference forward", int(working), detail)


def _base_weights(shape: ModelShape, qlora: bool, k: Kernels) -> tuple[float, str]:
    """The frozen model: 16-bit (fp32 on CPU), or for QLoRA the decoder linears in NF4."""
    if not qlora:
        return (
            shape.n_params * k.weights,
            f"{format_params(shape.n_params)} parameters at {k.weights} B",
        )
    other = shape.embed_params + shape.lm_head_params + shape.norm_params + shape.bias_params
    n_linear_tensors = len(shape.linear_shapes()) * shape.num_layers
    nf4 = nf4_bytes(shape.linear_params, n_linear_tensors)
    detail = (
        f"{format_params(shape.linear_params)} linear weights in NF4"
        f" ({nf4 / shape.linear_params:.3f} B each) + {format_params(other)}"
        f" embeddings/head/norms at {k.weights} B"
    )
    return nf4 + other * k.weights, detail


def _lora_weights(
    shape: ModelShape, s: dict[str, Any], adapter: int, n_lora: int
) -> tuple[float, str]:
    """The adapters, their gradients (same dtype) and the optimizer states."""
    optimizer = optimizer_bytes(shape, s, adapter)
    detail = (
        f"{n_lora / 1e6:.1f}M trainable values at {adapter} B, their gradients at {adapter} B"
        f" and {s['optimizer']} states ({optimizer / max(n_lora, 1):.1f} B per value)"
    )
    return 2 * n_lora * adapter + optimizer, detail


def _attention_masks(s: dict[str, Any], c: int) -> tuple[int, int]:
    """(boolean mask built once, additive copy per layer) for a padded batch of several rows.

    SDPA turns the (B x S x S) boolean mask into an additive one in the compute dtype in
    every layer, which the attention backward keeps. Quadratic in the sequence length; a
    single row needs no mask.
    """
    B, S = s["batch_size"], s["max_seq_len"]
    if B == 1:
        return 0, 0
    return B * S * S * MASK_BYTES, B * S * S * c


def _activations(
    shape: ModelShape, s: dict[str, Any], k: Kernels, adapter: int, n_lora: int, opts: Options
) -> tuple[float, float, float, str]:
    """(saved activations, one layer's backward transients, host bytes, detail) for one step.

    The transients are returned so the LM head can count only what exceeds them: backward
    runs the head first, then the layers. With offloading, what each layer saves outside the
    recomputed one (its input with checkpointing, all of it without) goes to host RAM, and
    OFFLOAD_GPU_LAYERS layers' worth stays on the GPU.
    """
    c, h, L = k.compute, shape.hidden_size, shape.num_layers
    T = s["batch_size"] * s["max_seq_len"]
    layer = layer_saved_per_token(shape, s, k, adapter, opts.liger, opts.tiled_mlp)
    transient = _backward_transient_per_token(shape, k, opts.liger, opts.tiled_mlp)
    shard = _tiled_shard(shape, s, k, adapter, opts.liger) if opts.tiled_mlp else 0
    per_token_once = 4 * h + 2 * shape.head_dim * c + BATCH_INPUT_BYTES  # final norm, rope, batch
    mask, layer_mask = _attention_masks(s, c)
    gc = s["gradient_checkpointing"]
    kept = L if not opts.offload else min(L, OFFLOAD_GPU_LAYERS)
    if gc:
        # Each layer keeps only its input; backward recomputes one layer at a time.
        act = T * (kept * c * h + layer + transient + per_token_once) + mask + layer_mask + shard
        host = T * L * c * h if opts.offload else 0
        detail = (
            f"{T} tokens x ({kept} layer inputs x {c * h} B + one recomputed layer"
            f" {layer / 1024:.0f} KiB + backward buffers {transient / 1024:.0f} KiB)"
        )
    else:
        act = T * (kept * layer + transient + per_token_once) + mask + kept * layer_mask + shard
        host = (T * L * layer + L * layer_mask) if opts.offload else 0
        detail = (
            f"{T} tokens x ({kept} layers x {layer / 1024:.0f} KiB"
            f" + backward buffers {transient / 1024:.0f} KiB)"
        )
    if layer_mask:
        detail += f" + attention masks {(mask + layer_mask * (1 if gc else kept)) / MIB:.0f} MiB"
    detail += _options_detail(opts, L, host, shard)
    if k.autocast and adapter != c:  # autocast caches a bf16 copy of each fp32 adapter
        act += n_lora * c
    # With checkpointing, the recomputed layer exists only during the layers' backward.
    layer_transient = T * transient + shard + (T * layer + layer_mask if gc else 0)
    return act, layer_transient, host, detail


def _options_detail(opts: Options, layers: int, host: float, shard: float) -> str:
    """What the long-context options changed, for the activations row."""
    words = []
    if opts.offload:
        words.append(f"all {layers} inputs copied to {host / GIB:.1f} GiB of pinned host RAM")
    if opts.liger:
        words.append("Liger RMSNorm/SwiGLU")
    if opts.tiled_mlp:
        words.append(f"MLP tiled, one shard's backward {shard / MIB:.0f} MiB")
    return f"; {', '.join(words)}" if words else ""


def _lm_head(
    shape: ModelShape, k: Kernels, tokens: int, layer_transient: float, fused: bool
) -> tuple[float, str]:
    """The LM head and loss: only the larger of its and a layer's transients adds up."""
    T, h, V, c = tokens, shape.hidden_size, shape.vocab_size, k.compute
    if fused:
        tile = min(T, FUSED_HEAD_TOKENS) * min(V, FUSED_HEAD_VOCAB)
        # Triton folds each tile in place; the torch fallback (CPU) makes fp32 temporaries.
        tile_bytes = tile * c + k.head_tile_temps * tile * 4
        saved = T * h * c  # the hidden states of the scored tokens
        transient = T * h * (4 + c) + tile_bytes  # fp32 gradient and its cast, tiles
        detail = (
            f"chunked LM head: {tile_bytes / MIB:.0f} MiB of tiles + {T} tokens x hidden and"
            f" its fp32 gradient (the {T} x {V} logits are never built)"
        )
    else:
        saved = T * V * (c + 4)  # bf16 logits and the fp32 log-softmax
        transient = T * V * (4 + 4)  # its gradient and the gradient of the logits
        detail = f"{T} x {V} logits: {c} B + fp32 copy, log-softmax and gradient (4 B each)"
    return saved + max(0, transient - layer_transient), detail


def _compact_head(
    shape: ModelShape, k: Kernels, tokens: int, layer_transient: float
) -> tuple[float, str]:
    """The studio's compact head (CUDA without Triton): the label positions' hidden states
    are kept; the logits come in pieces of HEAD_CHUNK_VALUES, each in the compute dtype, its
    fp32 copy and log-softmax, recomputed in backward with the fp32 gradient of the hidden."""
    T, h, V, c = tokens, shape.hidden_size, shape.vocab_size, k.compute
    piece = min(T * V, max(1, HEAD_CHUNK_VALUES // V) * V)
    saved = T * h * c
    transient = T * h * (4 + c) + piece * (c + 4 + 4 + 4)
    detail = (
        f"compact LM head (no Triton): pieces of {piece * (c + 12) / MIB:.0f} MiB + {T} tokens"
        " x hidden and its fp32 gradient"
    )
    return saved + max(0, transient - layer_transient), detail


def _workspace(shape: ModelShape, k: Kernels, qlora: bool) -> float:
    """Allocator-counted scratch: cuBLAS, plus QLoRA's dequantized weights on CUDA."""
    if not (qlora and k is CUDA):
        return k.workspace
    largest = max(a * b for a, b in shape.linear_shapes().values())
    return (
        k.workspace + 2 * largest * k.compute
    )  # one dequantized weight in forward, one in backward


def _overhead(k: Kernels, workspace: float, step_bytes: float) -> tuple[float, str]:
    """Memory outside the tensors: the context (or the process), workspace and allocator slack."""
    slack = k.slack * step_bytes
    if k is not CUDA:
        return k.context + workspace + slack, (
            f"Python, torch and the app: about {k.context / GIB:.1f} GiB"
        )
    detail = (
        f"CUDA context {k.context / MIB:.0f} MiB + workspace {workspace / MIB:.0f} MiB"
        f" + allocator slack {slack / MIB:.0f} MiB"
    )
    return k.context + workspace + slack, detail


def _notes(s: dict[str, Any], k: Kernels) -> list[str]:
    """What the numbers alone do not say."""
    notes = []
    if s["optimizer"] == "paged_adamw_8bit" and k is CUDA and compat.paged_optimizer_spills():
        notes.append(
            "paged 8-bit AdamW keeps its states in CUDA unified memory: they can spill to RAM"
            " under pressure, and torch's memory counters do not show them"
        )
    elif s["optimizer"] == "paged_adamw_8bit" and k is CUDA:
        notes.append(
            "paged 8-bit AdamW does not page on Windows: its states stay in VRAM, as counted"
            " here (CUDA unified memory spills to RAM on Linux only)"
        )
    if k is CUDA and compat.sysmem_fallback_possible():
        notes.append(
            "Windows: past the card's memory the NVIDIA driver may not stop with out-of-memory"
            " but move the overflow into system RAM, 10-50x slower. To get the error instead: "
            + compat.SYSMEM_FALLBACK_ADVICE
        )
    if k is not CUDA:
        notes.append(
            "CPU run: the memory is system RAM" + (" and compute is fp32" if k.compute == 4 else "")
        )
    return notes


def _option_notes(opts: Options, host: float, shape: ModelShape) -> list[str]:
    """What the long-context options cost, in words: host RAM, PCIe traffic, what they need."""
    notes = []
    if opts.offload:
        wait = 2 * host / PCIE_BYTES_PER_S
        notes.append(
            f"activation offloading (TRL): each step copies {host / GIB:.1f} GiB of layer inputs"
            f" to pinned host RAM and back, up to {wait:.1f} s of PCIe per step at"
            f" {PCIE_BYTES_PER_S / 1e9:.0f} GB/s; TRL overlaps it with compute on a side stream,"
            " so the cost is usually a few percent to 20% of the step"
        )
    if opts.liger:
        notes.append(
            "Liger kernels: RMSNorm and SwiGLU keep less for backward and are usually faster;"
            " the loss stays on TRL's fused LM head (no full-vocabulary logits either way)"
        )
    if opts.tiled_mlp:
        notes.append(
            "tiled MLP: the MLP runs in shards and its backward recomputes one shard at a"
            " time, so its activations never exist for the whole sequence; the MLP's forward"
            " runs once more per step, about 20% of a step"
        )
    return notes


# --------------------------------------------------------------------------- auto-fit


@dataclass
class AutoFit:
    """The settings auto-fit chose, the estimate for them and what it changed."""

    settings: dict[str, Any]
    estimate: VramEstimate
    changes: list[str]
    fits: bool

    def message(self) -> str:
        if not self.fits:
            return "Nothing fits: " + "; ".join(self.changes)
        if not self.changes:
            return "Already the largest batch that fits; nothing changed."
        return "Auto-fit: " + "; ".join(self.changes)


def auto_fit(
    shape: ModelShape,
    settings: RunConfig | Mapping[str, Any],
    *,
    capacity_bytes: int,
    in_use_bytes: int = 0,
    device: str = "cuda",
    headroom: float = HEADROOM,
) -> AutoFit:
    """The largest batch size (then sequence length) that fits with `headroom` spare.

    Gradient accumulation rises to keep the effective batch; gradient checkpointing is turned
    on before the sequence length is cut, since it costs time but not data.
    """
    start = run_settings(settings)
    effective = start["batch_size"] * start["grad_accum"]
    batches = sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= effective} | {effective})
    batches.reverse()
    budget = (1.0 - headroom) * max(0, capacity_bytes - in_use_bytes)

    def trial(**changes: Any) -> tuple[dict[str, Any], VramEstimate]:
        s = {**start, **changes}
        s["grad_accum"] = max(1, math.ceil(effective / s["batch_size"]))
        est = estimate(
            shape, s, capacity_bytes=capacity_bytes, in_use_bytes=in_use_bytes, device=device
        )
        return s, est

    checkpointing = [start["gradient_checkpointing"]]
    if not start["gradient_checkpointing"]:
        checkpointing.append(True)
    chosen: tuple[dict[str, Any], VramEstimate] | None = None
    for gc in checkpointing:
        for b in batches:
            s, est = trial(batch_size=b, gradient_checkpointing=gc)
            if est.total_bytes <= budget:
                chosen = (s, est)
                break
        if chosen:
            break
    if chosen is None:
        seq = start["max_seq_len"]
        while seq > 128 and chosen is None:
            seq = max(128, (seq // 2) // 64 * 64)
            s, est = trial(batch_size=1, gradient_checkpointing=True, max_seq_len=seq)
            if est.total_bytes <= budget:
                chosen = (s, est)
    if chosen is None:
        s, est = trial(batch_size=1, gradient_checkpointing=True, max_seq_len=128)
        hint = "switch to QLoRA" if start["method"] == "lora" else "pick a smaller model"
        return AutoFit(
            start,
            est,
            [
                f"even batch 1 with 128 tokens needs {est.total_bytes / GIB:.1f} GiB of"
                f" {budget / GIB:.1f} GiB usable: {hint}"
            ],
            False,
        )
    s, est = chosen
    changes = [
        f"{key} {start[key]} → {s[key]}"
        for key in ("batch_size", "grad_accum", "gradient_checkpointing", "max_seq_len")
        if s[key] != start[key]
    ]
    return AutoFit(s, est, changes, True)


# --------------------------------------------------------------------------- CLI


def _print_estimate(est: VramEstimate) -> None:
    print(f"{est.model}: {format_params(est.n_params)} parameters, device {est.device}")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in est.settings.items()))
    for part in est.parts:
        print(f"  {part.label:<34} {part.gib:7.2f} GiB   {part.detail}")
    print(f"  {'total':<34} {est.total_bytes / GIB:7.2f} GiB")
    print(f"  (torch max_memory_allocated should read about {est.allocated_bytes / GIB:.2f} GiB)")
    if est.capacity_bytes is not None:
        print(est.summary())
    for note in est.notes:
        print(f"note: {note}")


def main(argv: list[str] | None = None) -> int:
    """`python -m studio.hardware.vram MODEL [settings]`: print the estimate."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    parser.add_argument("--method", default="lora", choices=("lora", "qlora"))
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--target-modules", default="all_linear")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", default="paged_adamw_8bit")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--card-gb", type=float, help="card memory in GiB")
    parser.add_argument("--device", default="cuda", choices=tuple(KERNELS))
    parser.add_argument("--unfused", action="store_true", help="classic full-logits loss")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        shape = model_shape(args.model)
        est = estimate(
            shape,
            {
                "method": args.method,
                "lora_r": args.lora_r,
                "lora_alpha": 2 * args.lora_r,
                "target_modules": args.target_modules,
                "batch_size": args.batch_size,
                "grad_accum": args.grad_accum,
                "max_seq_len": args.max_seq_len,
                "gradient_checkpointing": args.gradient_checkpointing,
                "optimizer": args.optimizer,
                "lora_dropout": args.lora_dropout,
            },
            capacity_bytes=int(args.card_gb * GIB) if args.card_gb else None,
            device=args.device,
            fused_lm_head=not args.unfused,
        )
    except (ModelShapeError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_estimate(est)
    return 0


def run_estimate(
    model_path: str, cfg: Any, device: str, compact_head: bool, options: Options = Options()
) -> dict[str, Any]:
    """The estimate for a run as it was built, for its metadata (None figures if unknown).

    `device` is the run's ("cuda" or "cpu"); the context is counted once, by the estimate.
    `options`: the long-context options the run trains with (`studio.hardware.longctx`).
    """
    from studio.hardware.detect import estimate_kernel

    try:
        shape = model_shape(str(model_path))
        est = estimate(
            shape,
            cfg,
            device=estimate_kernel(device),
            compact_head=device.startswith("cuda") and compact_head,
            offload_activations=options.offload,
            liger_kernels=options.liger,
            tiled_mlp=options.tiled_mlp,
        )
    except (ModelShapeError, ValueError, KeyError) as exc:
        return {"estimate_bytes": None, "estimate_allocated_bytes": None, "why": str(exc)}
    return {
        "estimate_bytes": est.total_bytes,
        "estimate_allocated_bytes": est.allocated_bytes,
        "estimate_host_bytes": est.host_bytes,
    }


def measured_peak(device: str) -> dict[str, Any]:
    """torch's peak counters since the run's start, next to the estimate in the metadata:
    reserved includes allocator slack (and what `estimate_bytes` calls overhead, less the
    context); allocated is what `estimate_allocated_bytes` predicts. Every run calibrates."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        import psutil

        return {"measured_rss_bytes": int(psutil.Process().memory_info().rss)}
    return {
        "max_memory_reserved": int(torch.cuda.max_memory_reserved()),
        "max_memory_allocated": int(torch.cuda.max_memory_allocated()),
    }


if __name__ == "__main__":
    compat.console_safe()
    raise SystemExit(main())
