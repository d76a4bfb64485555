"""Prompts batched for generation, base and fine-tune rows in ONE batch: one home for the left
padding, the stop ids and the adapter switched per row, which Chat's A/B pass
(studio/chat/engine.py) and the training checks' sample answers (studio/train/checks.py) both
need, so the two cannot drift apart.

A row's adapter is switched one of two ways (`adapter_rows`):
- per-row scaling: every LoRA layer's scaling becomes a [rows, 1, 1] tensor, 0 for a base row,
  so that row adds an exact zero and reads the base; the batch runs the plain LoRA forward.
  On the 135M model on 2 CPU cores an A/B step costs what a batch of two fine-tuned rows does,
  where PEFT's sub-batch gather and scatter in each of its 210 LoRA layers added about a third;
- else PEFT's mixed adapter batches (`adapter_names`, "__base__" for a base row), which also
  cover modules_to_save and the other layer kinds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

MIXED_BASE = "__base__"  # PEFT's name for "no adapter" in a mixed adapter batch


def pad_id(tok: Any) -> int:
    """The id that fills a left-padded row: the tokenizer's pad, else its EOS (masked out)."""
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def left_pad(tok: Any, texts: list[str], device: Any) -> dict[str, Any]:
    """Prompts as one left-padded batch with its attention mask (and each real length).

    Padded by hand rather than through `tok(..., padding=True)`: that would flip the shared
    tokenizer's `padding_side` while another tab may be encoding. Left padding keeps every
    row's last real token at the end, where generation continues; `generate` derives each
    row's positions from the mask, so a padded row sees the positions it sees alone.
    """
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return left_pad_ids(ids, pad_id(tok), device)


def left_pad_ids(ids: list[list[int]], pad: int, device: Any) -> dict[str, Any]:
    """Token-id rows as one left-padded batch (see `left_pad`)."""
    import torch

    width = max(len(r) for r in ids)
    input_ids = [[pad] * (width - len(r)) + list(r) for r in ids]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in ids]
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long, device=device),
        "attention_mask": torch.tensor(mask, dtype=torch.long, device=device),
        "lengths": [len(r) for r in ids],
    }


def eos_ids(model: Any) -> set[int]:
    """The token ids that end a row in `generate` (the model's generation EOS, a list or one)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return {int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}


# Rows up to which one batched pass costs more than the rows one after the other, where a
# batch is dear: in fp32 on a CPU a 2-row decode step costs about 1.7 one-row steps (a 1-row
# matmul is a GEMV), so an A/B turn at natural lengths took 1.14x A then B (`bench chat`, a
# CPU without AVX-512). Batch compare's 16 rows a call still pay there.
DEAR_BATCH_ROWS = 2


def batch_cost_problem(model: Any, n_rows: int) -> str | None:
    """Why `n_rows` rows would answer slower in one batch than one after the other on the
    device `model` runs on, or None where batching pays (a GPU; a CPU in bf16, where a 2-row
    step costs what a 1-row step does: 0.73x at natural lengths)."""
    device = getattr(getattr(model, "device", None), "type", "cpu")
    dtype = str(getattr(model, "dtype", ""))
    if device != "cpu" or dtype != "torch.float32" or n_rows > DEAR_BATCH_ROWS:
        return None
    return (
        "fp32 on this CPU, where a batch of two costs about 1.7 answers:"
        " one after the other is faster"
    )


def mixed_batch_problem(
    model: Any, repetition_penalty: float = 1.0, lengths: list[int] | None = None
) -> str | None:
    """Why base and fine-tuned rows cannot share one `generate` call here, or None.

    PEFT mixes adapters per row only for unmerged, non-DoRA LoRA; and a repetition penalty
    counts every token of a row's input, so it would count the left padding of the shorter
    prompt and change that row's answer.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(model, PeftModel):
        return "no adapter attached"
    config = model.peft_config.get(model.active_adapter)
    kind = str(getattr(getattr(config, "peft_type", None), "value", "") or "")
    if kind != "LORA":
        return f"PEFT mixes only LoRA adapters in one batch (this one is {kind or 'unknown'})"
    if getattr(config, "use_dora", False):
        return "PEFT cannot mix a DoRA adapter with the base in one batch"
    if any(isinstance(m, BaseTunerLayer) and m.merged for m in model.modules()):
        return "the adapter is merged into the weights"
    experts = moe_experts(model)
    if experts:
        return (
            f"a mixture-of-experts model ({experts}): its expert layers see the rows' tokens"
            " flattened together, so the adapter cannot be switched per row"
        )
    if repetition_penalty != 1.0 and lengths and len(set(lengths)) > 1:
        return "a repetition penalty would count the padding of the shorter prompt"
    return None


# Config keys that mark a mixture-of-experts model: Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE count
# their experts, DeepSeek its routed ones, Qwen2-MoE sizes its shared expert.
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "n_shared_experts")
_MOE_SHARED_KEYS = ("shared_expert_intermediate_size",)


def moe_experts(model: Any) -> str | None:
    """ "num_experts=60"-like words when `model` (PEFT-wrapped or not) routes its tokens
    through experts, else None. Per-row LoRA scaling multiplies a [rows, T, H] output by a
    [rows, 1, 1] mask; an expert's LoRA layer sees [tokens, H] gathered across rows, so the
    mask would broadcast wrongly, and PEFT's per-row sub-batches would be silently wrong."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _MOE_KEYS + _MOE_SHARED_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and value > (1 if key in _MOE_KEYS else 0):
            return f"{key}={value}"
    return None


def _scalable_layers(model: Any, adapter: str) -> list[Any] | None:
    """The LoRA layers whose forward is `base(x) + lora_B(lora_A(x)) * scaling` for `adapter`,
    with fp32 adapter weights (as PEFT loads them), or None where any other part of the
    adapter (modules_to_save, embeddings, a LoRA variant) needs PEFT's own per-row switch."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    plain: tuple[type, ...] = (LoraLinear,)
    with contextlib.suppress(ImportError):
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt

        plain += (Linear4bit, Linear8bitLt)
    config = model.peft_config.get(adapter)
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return None
    layers = []
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        if not isinstance(module, plain) or adapter in getattr(module, "lora_variant", {}):
            return None
        if module.lora_B[adapter].weight.dtype != torch.float32:  # a float scale would round
            return None
        layers.append(module)
    return layers or None


@contextlib.contextmanager
def adapter_rows(
    model: Any, tuned: list[bool], ends: Iterable[int] | None = None
) -> Iterator[dict[str, Any]]:
    """Generate a batch whose rows read the fine-tune (True) or the base (False): yields the
    extra `generate` arguments, and restores the model on the way out.

    Per-row scaling where every LoRA layer allows it (see the module docstring), else PEFT's
    `adapter_names`. With per-row scaling, once every fine-tuned row has ended (at a token of
    `ends`, the model's EOS by default), the LoRA layers are switched off for the steps left:
    the base rows still going cost what the base alone costs (a fine-tune that learned short
    answers leaves the base writing on its own). The caller checks `mixed_batch_problem`
    first and holds the model alone while this runs (the switch is the model's own state).
    """
    import torch

    adapter = model.active_adapter
    layers = _scalable_layers(model, adapter)
    if layers is None:
        yield {"adapter_names": [adapter if t else MIXED_BASE for t in tuned]}
        return
    masks: dict[Any, Any] = {}
    saved = [(layer, layer.scaling[adapter]) for layer in layers]
    tail = _base_tail(layers, tuned, set(ends) if ends is not None else eos_ids(model))
    try:
        for layer, scale in saved:
            device = layer.lora_B[adapter].weight.device
            if device not in masks:
                rows = [1.0 if t else 0.0 for t in tuned]
                masks[device] = torch.tensor(rows, dtype=torch.float32, device=device)
            layer.scaling[adapter] = masks[device].view(-1, 1, 1) * scale
        yield {"logits_processor": tail} if tail is not None else {}
    finally:
        for layer, scale in saved:
            layer.scaling[adapter] = scale
        if tail is not None and tail[0].off:
            for layer in layers:
                layer.enable_adapters(True)


def _base_tail(layers: list[Any], tuned: list[bool], ends: set[int]) -> Any:
    """A logits processor that changes no score: it watches the fine-tuned rows' last tokens
    and, once all have ended, turns the LoRA layers off (`enable_adapters(False)`, as PEFT's
    `disable_adapter` does). None where there is no base row to gain from it, or no end."""
    from transformers import LogitsProcessor, LogitsProcessorList

    rows = [i for i, t in enumerate(tuned) if t]
    if not rows or len(rows) == len(tuned) or not ends:
        return None

    class _BaseTail(LogitsProcessor):
        def __init__(self) -> None:
            self.width: int | None = None
            self.ended: set[int] = set()
            self.off = False

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if self.width is None:  # the first call sees the prompts alone
                self.width = input_ids.shape[1]
            elif not self.off:
                last = input_ids[rows, -1].tolist()
                self.ended |= {r for r, tok in zip(rows, last, strict=True) if tok in ends}
                if len(self.ended) == len(rows):
                    for layer in layers:
                        layer.enable_adapters(False)
                    self.off = True
            return scores

    return LogitsProcessorList([_BaseTail()])
