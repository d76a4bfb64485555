"""The tiled MLP (`studio.train.tiled_mlp`) on the real embedded model, on CPU.

It must change memory, never the result: the gradients of every LoRA weight match the untiled
MLP's under the recipe's gradient checkpointing, the activations kept for backward shrink by
the MLP's, and a run with `tiled_mlp: on` tiles every MLP of the model it trains.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from studio.config import RunConfig
from studio.train import tiled_mlp


def lora_model(path: Path, tiled: bool, checkpointing: bool = True, dtype: str = "float32"):
    """The embedded model with LoRA on every linear layer, B not zero, so that every adapter
    weight (the MLP's included) gets a gradient."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(model, config)
    if tiled:
        assert tiled_mlp.install(model, tokens_per_shard=48) == model.config.num_hidden_layers
    return model


def tokens(n: int = 128, rows: int = 1):
    import torch

    return torch.randint(100, 40_000, (rows, n), generator=torch.Generator().manual_seed(1))


def test_tiled_gradients_match_the_plain_mlps_under_checkpointing(embedded_model) -> None:
    """In float64, so that a wrong gradient cannot hide in the rounding of a sum taken in
    another order (fp32 through 30 layers moves the first layer's gradients by about 1e-3)."""
    import torch

    ids = tokens()
    grads, losses = {}, {}
    for tiled in (False, True):
        model = lora_model(embedded_model.path, tiled, dtype="float64")
        # An outer hook, as TRL's activation offloading sets one around the whole step: the
        # shards' recompute in backward must keep out of it.
        in_backward, packed = [False], []

        def pack(t, in_backward=in_backward, packed=packed):
            packed.extend([tuple(t.shape)] if in_backward[0] else [])
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
            in_backward[0] = True
            loss.backward()
        assert packed == [], packed[:3]
        losses[tiled] = loss.item()
        grads[tiled] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert losses[True] == pytest.approx(losses[False], rel=1e-12)
    mlp_grads = [n for n in grads[True] if "mlp" in n]
    assert len(mlp_grads) == 3 * 2 * 30  # gate/up/down, lora_A/B, every layer
    assert tiled_mlp.dense_mlps(model) == []  # all 30 tiled (marked)
    for name, plain in grads[False].items():
        got = grads[True][name]
        assert got is not None and float(got.abs().max()) > 0, name
        scale = float(plain.abs().max())
        assert float((got - plain).abs().max()) <= 1e-9 * scale, name


def test_the_recompute_runs_under_the_forwards_autocast(embedded_model) -> None:
    """The step's forward runs under autocast (bf16 here; a GPU's bf16/fp16), its backward
    outside it: each shard must be recomputed as the forward computed it."""
    import torch

    model = lora_model(embedded_model.path, tiled=False, checkpointing=False)
    mlp = tiled_mlp.dense_mlps(model)[0]
    inner, seen = mlp.forward, []

    def watched(x):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
        return inner(x)

    mlp.forward = watched
    tiled_mlp.install(model, tokens_per_shard=32)
    ids = tokens(64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert [grad for grad, _ in seen] == [False, False, True, True]  # 2 shards, each twice
    assert all(autocast for _, autocast in seen), seen


def test_tiling_keeps_less_for_backward(embedded_model) -> None:
    """Without checkpointing every layer keeps its activations: tiled, the MLP keeps only its
    input, so at least gate, up and silu(gate) (3 x intermediate, fp32) go, in every layer.
    Counted in the forward: what the tiles save in backward lives one shard at a time."""
    import torch

    ids = tokens(64)
    kept = {}
    for tiled in (False, True):
        model = lora_model(embedded_model.path, tiled, checkpointing=False)
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        kept[tiled] = total[0]
        loss.backward()  # the tiles' backward runs (and saves its shards) outside the count
    cfg = model.config
    mlp = cfg.num_hidden_layers * ids.numel() * 3 * cfg.intermediate_size * 4
    assert kept[False] - kept[True] >= mlp, (kept, mlp)


@pytest.mark.slow
def test_a_run_with_tiled_mlp_on_tiles_every_mlp(
    embedded_model, tokenizer, tmp_path: Path, monkeypatch
) -> None:
    """Through the recipe the app uses: the choice, the callback that tiles the MLPs once
    training begins, and a step whose MLP calls go through the tiles (rows longer than the
    hidden size: two shards each)."""
    from studio.train import recipe

    calls = []
    real = tiled_mlp.tiled_call

    def counted(forward, x, tokens_per_shard):
        calls.append((tuple(x.shape), tokens_per_shard))
        return real(forward, x, tokens_per_shard)

    monkeypatch.setattr(tiled_mlp, "tiled_call", counted)
    cfg = RunConfig(device="cpu", max_steps=1, batch_size=1, max_seq_len=700, tiled_mlp="on")
    n = 700
    rows = [{"input_ids": list(range(200, 200 + n)), "completion_mask": [1] * n}]
    built = recipe.build(cfg, Path(embedded_model.path), tokenizer, "cpu", tmp_path, rows, [])
    assert built.long_context.tiled.on and built.summary["tiled_mlp"] is True
    built.trainer.train()
    model = built.trainer.model
    marked = [m for m in model.modules() if getattr(m, tiled_mlp.MARK, False)]
    assert len(marked) == model.config.num_hidden_layers
    hidden = model.config.hidden_size
    assert calls and all(shape[-2] == n and per == hidden for shape, per in calls)
    assert built.trainer.state.log_history[-1]["train_loss"] > 0
