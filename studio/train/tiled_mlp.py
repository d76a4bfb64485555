"""Tiled MLP: each decoder layer's MLP runs over the tokens in shards, and its backward
recomputes one shard at a time, so the MLP's activations (gate, up, their product and the
LoRA branches' inputs: about 3 x intermediate_size values a token, the most a layer keeps)
never exist for the whole sequence at once. It is what takes a 12 GB card past 16k tokens.

The design is DeepSpeed's `TiledMLP` (Arctic Long Sequence Training, arXiv 2506.13996), also
shipped in Liger-Kernel as `LigerTiledMLPFunction`. The studio keeps these few lines of plain
PyTorch rather than import Liger's: Liger's package imports Triton when it loads, and Triton
does not install on Windows, where a 12 GB card needs this the most. No kernel is involved.

Cost: the MLP's forward runs once more per step (under gradient checkpointing, three times
instead of two), about 20% of a step. So `studio.hardware.longctx` turns it on only where the
run does not fit otherwise. Multi-process runs do not use it: DDP reduces gradients from hooks
as they accumulate, and how those meet a backward run inside the backward is untested here.
"""

from __future__ import annotations

import math
from typing import Any

MARK = "_studio_tiled_mlp"  # set on an MLP module whose forward is wrapped


def _kept(tensor: Any) -> Any:
    """A shard's saved tensors stay where they are, outside any outer hooks: TRL's activation
    offloading packs what a step saves (its context spans the backward too) and would else
    track, copy out and prefetch the shards' tensors as if the forward had saved them."""
    return tensor


def _autocast_state(device_type: str) -> dict[str, Any]:
    """The forward's autocast, to recompute under in backward (as torch's checkpoint does):
    the backward runs where autocast is off (on CUDA, in autograd's own thread), and a shard
    recomputed in another dtype would not be the function whose output the step used."""
    import torch

    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
    }


def _shards_backward(
    mlp_forward: Any, x: Any, grad: Any, shards: int, autocast: dict[str, Any]
) -> Any:
    """Recompute each shard with a graph and run its backward at once: LoRA's weights get
    their gradients here (accumulated in `.grad`, as the optimizer expects); the input's
    gradient is returned, shard by shard."""
    import torch

    x_grad = torch.zeros_like(x)
    pieces = (t.chunk(shards, dim=-2) for t in (x, grad, x_grad))
    parts = zip(*pieces, strict=True)
    with torch.autograd.graph.saved_tensors_hooks(_kept, _kept):
        for part, part_grad, part_x_grad in parts:
            part = part.detach().requires_grad_(x.requires_grad)
            with torch.enable_grad(), torch.autocast(**autocast):
                out = mlp_forward(part)
            torch.autograd.backward(out, part_grad)
            if part.grad is not None:
                part_x_grad.copy_(part.grad)
    return x_grad


def _autograd_function() -> Any:
    """The autograd Function, built on first use: torch is imported lazily."""
    import torch

    class TiledMLP(torch.autograd.Function):
        """Forward without a graph, shard by shard, keeping only the input."""

        @staticmethod
        def forward(ctx: Any, mlp_forward: Any, x: Any, shards: int) -> Any:
            ctx.mlp_forward, ctx.shards = mlp_forward, shards
            ctx.autocast = _autocast_state(x.device.type)
            ctx.save_for_backward(x)
            with torch.no_grad():
                return torch.cat([mlp_forward(part) for part in x.chunk(shards, dim=-2)], dim=-2)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[None, Any, None]:
            (x,) = ctx.saved_tensors
            x_grad = _shards_backward(ctx.mlp_forward, x, grad, ctx.shards, ctx.autocast)
            return None, x_grad, None

    return TiledMLP


_FUNCTION: Any = None


def tiled_call(mlp_forward: Any, x: Any, tokens_per_shard: int) -> Any:
    """`mlp_forward(x)`, tiled over the sequence (dim -2) in shards of about
    `tokens_per_shard` rows; a plain call where no gradient is taken or one shard is enough."""
    global _FUNCTION
    import torch

    shards = math.ceil(x.shape[-2] / max(1, tokens_per_shard))
    # Without a gradient into x the output would not need one either, and the MLP's own
    # LoRA weights (not inputs of the Function) would be skipped: call it plainly then.
    if shards <= 1 or not torch.is_grad_enabled() or not x.requires_grad:
        return mlp_forward(x)
    if _FUNCTION is None:
        _FUNCTION = _autograd_function()
    return _FUNCTION.apply(mlp_forward, x, shards)


def dense_mlps(model: Any) -> list[Any]:
    """The decoder layers' dense MLPs (a `down_proj`, no experts): what tiling applies to.
    A mixture-of-experts block routes tokens and keeps router logits: it is left alone."""
    found = []
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if mlp is None or getattr(mlp, MARK, False) or mlp in found:
            continue
        if hasattr(mlp, "down_proj") and not hasattr(mlp, "experts"):
            found.append(mlp)
    return found


def install(model: Any, tokens_per_shard: int | None = None) -> int:
    """Tile every dense MLP of `model` (after Liger's patch, which replaces the forward: the
    tiled call wraps whatever forward the module has now). Returns how many were tiled.

    `tokens_per_shard`: None takes the model's hidden size (DeepSpeed's and Liger's default:
    a shard's activations are then about the size of the layer's weights)."""
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 4096)
    mlps = dense_mlps(model)
    for mlp in mlps:
        _wrap(mlp, tokens_per_shard or hidden)
    return len(mlps)


def _wrap(mlp: Any, tokens_per_shard: int) -> None:
    inner = mlp.forward

    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:  # a signature the studio did not see: leave it untiled
            return inner(x, *args, **kwargs)
        return tiled_call(inner, x, tokens_per_shard)

    mlp.forward = forward
    setattr(mlp, MARK, True)


def callback(tokens_per_shard: int | None = None) -> Any:
    """A TrainerCallback that tiles the model's MLPs as training begins: after `Trainer.train`
    applies Liger's kernels (which replace the MLP's forward), so the tiles wrap Liger's."""
    from transformers import TrainerCallback

    class TileMLPs(TrainerCallback):
        tiled = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs.get("model")
            if model is not None:
                self.tiled += install(model, tokens_per_shard)

    return TileMLPs()
