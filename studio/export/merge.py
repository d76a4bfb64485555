"""Merge step: fold the adapter into the base, save it, and prove the merge is faithful.

Picks the merge device/dtype (`choose_precision`) and the save dtype (`choose_save_dtype`),
then compares greedy answers and logits of the reloaded merged folder with base+adapter
(`compare`, `SanityCheck`). The GGUF check reuses the same comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio import gpu
from studio.data import chat_format
from studio.export.common import ExportError, Message, Progress
from studio.models import loader as models
from studio.models.generate import greedy_each
from studio.runs import Run, read_json
from studio.util import short_error

SANITY_TOKENS = 32
# Models below this many parameters keep their merged weights in float32: the merge stays
# exact and the file is at most 4 GB (a 1B model in fp16 is 2 GB), cheap next to the GGUF
# and far from the rounding that fp16 adds. Larger models are saved in 16-bit.
FP32_MAX_PARAMS = 1_000_000_000
# float16's largest finite value; weights are saved in fp16 only when they stay well below
# it (an eighth), so no weight rounds to inf and scaled activations keep headroom.
FP16_MAX = 65504.0
FP16_SAFE_MAX = FP16_MAX / 8


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
    # Largest |logit| change at that same position: the rounding that could have flipped it.
    change_at_split: float | None = None
    near_tie: bool = False  # margin <= 2 x change_at_split: rounding there can flip the pick

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
class SavedDtype:
    """The dtype the merged weights were saved in and why, from the merged tensors themselves."""

    dtype: str  # float32, float16 or bfloat16
    reason: str
    params: int = 0
    max_abs: float = 0.0  # largest |weight| over all merged tensors
    largest: str = ""  # the tensor that holds it
    merge: str = ""  # how the merge itself ran, e.g. "on the CPU in float32 (exact)"

    @property
    def note(self) -> str:
        return f"Merged {self.merge}; saved in {self.dtype}: {self.reason}."


# --------------------------------------------------------------------------- merge


def _safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) or sum(
        f.stat().st_size for f in folder.glob("*.bin")
    )


def _config_dtype(folder: Path) -> str:
    cfg = read_json(folder / "config.json")
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    return name if name in ("bfloat16", "float16", "float32") else "bfloat16"


def param_count(folder: Path) -> int:
    """Parameters of a model folder, from its weight files' size and stored dtype."""
    per = 4 if _config_dtype(folder) == "float32" else 2
    return _safetensors_bytes(folder) // per


def choose_precision(base_path: Path) -> tuple[str, str, str]:
    """(device, merge dtype, reason): float32 wherever it fits, never 4-bit.

    The LoRA delta of a short run is far below a 16-bit weight's rounding step, so adding it
    in bf16 (or fp16) loses part of what was learned; in float32 the sum is exact and the one
    rounding happens when saving, in the dtype `choose_save_dtype` picks for it.
    """
    import torch

    params = param_count(base_path)
    busy = gpu_taken()
    if torch.cuda.is_available() and busy is None:
        free, _total = torch.cuda.mem_get_info()
        if free > params * 4 * 1.3:
            return "cuda", "float32", f"on the GPU in float32 ({free / 2**30:.1f} GiB free)"
    avail = available_ram()
    if avail is None or avail > params * 4 * 1.5:
        return "cpu", "float32", f"on the CPU in float32 (exact){busy_note(busy)}"
    return (
        "cpu",
        "bfloat16",
        "on the CPU in bfloat16, which may round part of the adapter away: float32 would need"
        f" {params * 4 / 2**30:.1f} GiB of RAM, {avail / 2**30:.1f} GiB are free{busy_note(busy)}",
    )


def gpu_taken() -> str | None:
    """Why export must not use the GPU now (a training run holds it), or None.

    Sizing by free VRAM alone let a merge or a GGUF check load next to a running GPU run,
    which then died of out-of-memory. Export waits for nothing: it works on the CPU and
    says so. The check is the same hand-over rule Chat follows (fails closed)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return "a training run is using the GPU" if gpu.training_blocker() else None


def busy_note(busy: str | None) -> str:
    return f": not on the GPU, {busy}" if busy else ""


def _largest_weight(tensors: Mapping[str, Any]) -> tuple[str, float]:
    """(name, max |w|) over the floating-point tensors of a state dict."""
    name, top = "", 0.0
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel():
            m = float(t.detach().abs().amax())
            if m > top or m != m:  # NaN wins: it must not pass as "fits"
                name, top = key, m
    return name, top


def choose_save_dtype(tensors: Mapping[str, Any], params: int | None = None) -> SavedDtype:
    """float32 under FP32_MAX_PARAMS, else float16 when every weight fits, else bfloat16.

    fp16 keeps 3 more mantissa bits than bf16, which is what a small LoRA delta needs (on a
    short run of the embedded model the logits moved 0.021 in fp16 and 0.31 in bf16 against
    base+adapter, for an adapter effect of 2.09), but it overflows above 65504. `params`
    counts shared (tied) tensors once; by default every tensor is counted.
    """
    params = sum(t.numel() for t in tensors.values()) if params is None else params
    name, top = _largest_weight(tensors)
    found = SavedDtype("", "", params, round(top, 6), name)
    size = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"
    size += " parameters"
    mag = f"{top:,.0f}" if top >= 1000 else f"{top:.4g}"
    if params < FP32_MAX_PARAMS:
        found.dtype = "float32"
        found.reason = (
            f"{size}, under {FP32_MAX_PARAMS / 1e9:g}B, so the merge is kept exact at"
            f" {params * 4 / 1e9:.2g} GB (largest |weight| {mag}, in {name})"
        )
    elif top <= FP16_SAFE_MAX:
        found.dtype = "float16"
        found.reason = (
            f"{size}; the largest |weight| is {mag} (in {name}), well below float16's"
            f" limit {FP16_MAX:g}, and float16 keeps the small LoRA delta that bfloat16 rounds"
            " away"
        )
    else:
        found.dtype = "bfloat16"
        found.reason = (
            f"{size}; {name} holds a weight of magnitude {mag}, beyond float16's safe"
            f" range (limit {FP16_MAX:g}, kept below {FP16_SAFE_MAX:g}), so bfloat16 (float32's"
            " range) is used. Its 8-bit mantissa rounds each weight by up to 0.4%, which can erase"
            " part of a small LoRA update: the sanity check below shows how much moved"
        )
    return found


def available_ram() -> int | None:
    """Free RAM in bytes (None when psutil cannot tell): sizes the merge and the GGUF check."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def torch_dtype(name: str):
    """The torch dtype for a name as saved in export_info.json and config.json."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def encode_prompt(tok: Any, conv: list[Message]) -> list[int]:
    """A conversation as the token ids the model answers from (template applied once)."""
    text = chat_format.render(tok, conv, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


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
        case = SanityCase(
            prompt=conv[-1]["content"],
            expected=tok.decode(a, skip_special_tokens=True).strip(),
            got=tok.decode(b, skip_special_tokens=True).strip(),
            match=diff is None,
            first_difference=diff,
            max_logit_diff=round(change, 6),
        )
        if diff is not None and diff < min(len(a), len(b)) and diff < ra.shape[0]:
            _judge_split(case, ra[diff], ta[diff], a[diff], b[diff])
        cases.append(case)
    return SanityCheck(title, cases)


def _judge_split(case: SanityCase, ref_row: Any, test_row: Any, want: int, picked: int) -> None:
    """Mark a split a near-tie only if the logit change AT the split can explain it.

    Both rows are the two models' logits at the split, after the same prefix. The tested
    model picks `picked` over `want` only if their gap in the reference (the margin) was
    closed there, which takes |change of want| + |change of picked|, at most twice the
    largest change in that row. A large change at some other position explains nothing
    here, so it is not used (it is still bounded by the check's own 10% rule).
    """
    margin = float(ref_row[want] - ref_row[picked])
    change = float((ref_row - test_row).abs().max())
    case.margin = round(margin, 6)
    case.change_at_split = round(change, 6)
    case.near_tie = margin <= 2 * change


def merge_adapter(
    src: Run,
    base: models.ResolvedModel,
    out_dir: Path,
    prompts: list[list[Message]],
    progress: Progress,
    max_new_tokens: int = SANITY_TOKENS,
) -> tuple[SanityCheck, SavedDtype, Any, list[list[int]], tuple[list[list[int]], list[Any]]]:
    """Merge the adapter into the float32 base, save it, reload it and compare greedy answers.

    Returns (check, how it was merged and saved, tokenizer, prompt ids, (merged answers,
    their logits)).
    """
    from peft import PeftModel

    device, merge_dt, reason = choose_precision(base.path)
    tok = models.load_run_tokenizer(src.adapter_dir, base.path, src.chat_template)
    prompt_ids = [encode_prompt(tok, c) for c in prompts]

    progress(f"Loading the base {base.name} ({merge_dt}, {device})", 0.08)
    model = models.load_model(
        base.path,
        device=device,
        dtype=torch_dtype(merge_dt),
        trust_remote_code=src.trust_remote_code,
    )
    try:
        model = PeftModel.from_pretrained(model, str(src.adapter_dir))
    except Exception as exc:
        raise ExportError(
            f"The adapter of {src.name} does not fit the base model {base.name}:"
            f" {short_error(exc)}. The base model may have changed since training."
        ) from exc
    model.eval()
    progress("Greedy answers of base+adapter (the reference)", 0.15)
    reference, ref_logits, effect = _reference(model, tok, prompt_ids, max_new_tokens)

    progress("Merging the adapter into the base weights", 0.25)
    saved = _save_merged(model, tok, out_dir, progress, prompt_ids)
    model = None
    gpu.free_memory()

    progress("Reloading the merged folder with plain transformers (no peft)", 0.4)
    reloaded = models.load_model(
        out_dir, device=device, dtype=torch_dtype(merge_dt), trust_remote_code=src.trust_remote_code
    )
    reloaded.eval()
    got = greedy_each(reloaded, tok, prompt_ids, max_new_tokens)
    on_ref = [teacher_logits(reloaded, p, r) for p, r in zip(prompt_ids, reference, strict=True)]
    own = [teacher_logits(reloaded, p, g) for p, g in zip(prompt_ids, got, strict=True)]
    reloaded = None
    gpu.free_memory()
    check = compare(
        "merged folder vs base+adapter", prompts, tok, reference, got, ref_logits, on_ref
    )
    check.adapter_effect = round(effect, 6)
    if effect == 0.0:
        check.note = "The adapter changes no logit at all (are its weights all zero?)."
    saved.merge = reason
    return check, saved, tok, prompt_ids, (got, own)


def _reference(
    model: Any, tok: Any, prompt_ids: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], list[Any], float]:
    """base+adapter's greedy answers, their logits, and how far the adapter moves logits."""
    reference = greedy_each(model, tok, prompt_ids, max_new_tokens)
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
    return reference, ref_logits, effect


def save_dtype_for(
    model: Any, prompt_ids: list[list[int]], params: int | None = None
) -> SavedDtype:
    """`choose_save_dtype`, and where it picks float16, a look at the activations too.

    The weights' range is not enough: families trained in bf16 (Gemma is the known case)
    carry activations past float16's limit although every weight fits, and the fp16 model
    then answers inf/NaN. So the merged model runs the validation prompts, and bfloat16 is
    kept, with the reason, when any module's output would overflow float16."""
    saved = choose_save_dtype(model.state_dict(), params or model.num_parameters())
    if saved.dtype != "float16" or not prompt_ids:
        return saved
    peak, where = activation_peak(model, prompt_ids)
    shown = f"{peak:,.0f}" if math.isfinite(peak) else str(peak)
    if math.isfinite(peak) and peak <= FP16_MAX:
        saved.reason += (
            f"; on the validation prompts its activations peak at {shown} (in {where}),"
            " within float16's range"
        )
        return saved
    saved.dtype = "bfloat16"
    saved.reason = (
        f"every weight fits float16, but on the validation prompts an activation reaches"
        f" {shown} (in {where}), beyond float16's limit {FP16_MAX:g}: the float16 model would"
        " answer inf/NaN, so bfloat16 (float32's range) is kept"
    )
    return saved


def activation_peak(model: Any, prompt_ids: list[list[int]]) -> tuple[float, str]:
    """The largest |output| of any module over the prompts, and the module's name."""
    import torch

    peaks: dict[str, Any] = {}

    def hook(name: str):
        def record(_module: Any, _inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(out) and out.is_floating_point() and out.numel():
                top = out.detach().abs().amax().float()
                peaks[name] = torch.maximum(peaks[name], top) if name in peaks else top

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.inference_mode():
            for ids in prompt_ids:
                model(input_ids=torch.tensor([ids], device=model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if not peaks:
        return 0.0, ""
    values = {n: float(v) for n, v in peaks.items()}  # one host read per module, at the end
    bad = [n for n, v in values.items() if not math.isfinite(v)]
    name = bad[0] if bad else max(values, key=values.__getitem__)
    return values[name], name


def _save_merged(
    model: Any, tok: Any, out_dir: Path, progress: Progress, prompt_ids: list[list[int]]
) -> SavedDtype:
    """Fold the adapter in and save the result (safetensors, tokenizer, chat template)."""
    merged = model.merge_and_unload()
    saved = save_dtype_for(merged, prompt_ids)
    save_dt = saved.dtype
    merged = merged.to(torch_dtype(save_dt))
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    if tok.pad_token_id is not None:
        merged.generation_config.pad_token_id = tok.pad_token_id
    progress(f"Saving the merged model ({save_dt} safetensors)", 0.3)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    if getattr(tok, "chat_template", None) and not (out_dir / "chat_template.jinja").is_file():
        (out_dir / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
    return saved


def case_verdict(c: SanityCase) -> str:
    """One case in a few words, for the CLI and the UI table."""
    if c.match:
        return "same"
    if c.margin is None or c.change_at_split is None:
        return f"DIFFERS from token {c.first_difference}"
    sign = "≤" if c.near_tie else ">"
    why = f"lead {c.margin:.3g} {sign} 2× logit change there {c.change_at_split:.3g}"
    if c.near_tie:
        return f"near-tie at token {c.first_difference} ({why})"
    return f"DIFFERS from token {c.first_difference}, {why}"
