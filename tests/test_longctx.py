"""Long context on a 12 GB card: TRL's activation offloading, Liger's kernels and the tiled
MLP, tested on CPU.

The estimate's figures for Llama-3.1-8B QLoRA r32 batch 1 (Unsloth's published run), the
choice the studio makes for each machine (capabilities faked as a machine would report them:
a 12 GiB card, Triton, liger-kernel, free RAM), that SFTConfig receives the choice, and that a
CPU run turns offloading off with the reason. The tiled MLP is plain PyTorch: it trains the real
embedded model here, with gradients checked against the untiled MLP. Training with the other
two needs a GPU: `python -m studio.bench gpu` measures it (its long-context section).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from studio.config import ConfigError, RunConfig
from studio.hardware import longctx, vram

GIB = vram.GIB
LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
CARD_12GB = 12 * GIB
# A gaming PC with a 12 GB card, Triton working, liger-kernel installed, 24 GiB of RAM free.
GAMING_PC = longctx.Capabilities(True, True, "a test kernel compiled", True, 24 * GIB)


def unsloth_run(seq_len: int, **changes) -> dict:
    """Llama-3.1-8B QLoRA r32 batch 1, as in Unsloth's published long-context figure."""
    return {"method": "qlora", "lora_r": 32, "lora_alpha": 64, "target_modules": "all_linear",
            "batch_size": 1, "grad_accum": 1, "max_seq_len": seq_len,
            "gradient_checkpointing": True, "optimizer": "paged_adamw_8bit", **changes}  # fmt: skip


def longest(options: bool, tiled: bool = False, **changes) -> int:
    """The longest length (multiple of 256) the estimate does not call "won't fit" on 12 GiB."""
    from studio.tools.gpu import _longest

    shape = vram.model_shape(LLAMA_8B)

    def fits(n: int) -> bool:
        est = vram.estimate(shape, unsloth_run(n, **changes), capacity_bytes=CARD_12GB,
                            offload_activations=options, liger_kernels=options,
                            tiled_mlp=tiled)  # fmt: skip
        return est.verdict != "won't fit"

    return _longest(fits) or 0


# --- the estimate -----------------------------------------------------------------------------


def test_offloading_and_liger_take_the_8b_run_from_8k_to_15k_tokens_on_12_gib() -> None:
    # Without them the 32 checkpointed layer inputs (256 KiB a token) stay on the card.
    assert longest(False) == 8192
    assert longest(True) == 15_360
    # Unsloth's notebooks train with LoRA dropout 0: no per-module dropped-out copies.
    assert longest(True, lora_dropout=0.0) == 18_688
    assert longest(True, lora_dropout=0.0) < 21_848  # the goal: not without the tiled MLP


def test_the_tiled_mlp_takes_the_8b_run_past_unsloths_21848_tokens_on_12_gib() -> None:
    assert longest(True, tiled=True) >= 21_848  # the presets' LoRA dropout 0.05
    # Without Triton (Windows): no Liger, offloading and the tiled MLP still go past 16k.
    assert longest(False, tiled=True) < longest(True, tiled=True)
    shape = vram.model_shape(LLAMA_8B)
    on = dict(offload_activations=True, liger_kernels=True)
    windows = vram.estimate(shape, unsloth_run(16_384), capacity_bytes=CARD_12GB,
                            offload_activations=True, tiled_mlp=True)  # fmt: skip
    assert windows.verdict != "won't fit"
    tiled = vram.estimate(shape, unsloth_run(21_848), capacity_bytes=CARD_12GB,
                          tiled_mlp=True, **on)  # fmt: skip
    assert tiled.verdict != "won't fit" and tiled.to_dict()["tiled_mlp"] is True
    assert any("tiled MLP" in n and "20%" in n for n in tiled.notes)  # its cost, stated


def test_the_tiled_mlp_keeps_the_mlps_input_instead_of_its_activations() -> None:
    """By hand, for LoRA dropout 0 in bf16 (one saved copy per input, shared by the modules
    reading it): the recomputed layer's MLP keeps gate, silu(gate) and up (3 x intermediate),
    the LoRA inputs of gate/up (hidden) and down (intermediate), and lora_A's outputs (r each);
    tiled, it keeps its input (hidden). Its backward's buffers are then the attention's (the
    gradients of q, k, v and its output), not SiLU-mul's 3 x intermediate. One shard's worth
    (a hidden size of tokens) of the MLP's activations and gradients comes back in backward."""
    shape = vram.model_shape(LLAMA_8B)
    T, c, r = 16_384, 2, 32
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    run = unsloth_run(T, lora_dropout=0.0)
    plain = vram.estimate(shape, run)
    tiled = vram.estimate(shape, run, tiled_mlp=True)
    mlp = 3 * c * i + c * h + c * i + 3 * c * r
    saved = mlp - c * h
    buffers = 3 * c * i - c * (2 * q + 2 * kv)
    shard = h * (mlp + 3 * c * i)
    assert plain.part("activations") - tiled.part("activations") == T * (saved + buffers) - shard


def test_offloading_leaves_two_layer_inputs_on_the_gpu_and_pins_all_of_them_in_ram() -> None:
    shape = vram.model_shape(LLAMA_8B)
    T, h, L = 16_384, shape.hidden_size, shape.num_layers
    plain = vram.estimate(shape, unsloth_run(T))
    off = vram.estimate(shape, unsloth_run(T), offload_activations=True)
    assert plain.part("activations") - off.part("activations") == T * (L - 2) * 2 * h
    assert off.host_bytes == T * L * 2 * h  # 8 GiB of pinned copies at 16k tokens
    assert plain.host_bytes == 0
    assert off.part("base") == plain.part("base")
    assert any("PCIe" in n and "host RAM" in n for n in off.notes)  # the speed cost, stated
    assert off.to_dict()["activation_offloading"] is True


def test_liger_keeps_less_in_the_recomputed_layer() -> None:
    shape = vram.model_shape(LLAMA_8B)
    c, h, i = 2, shape.hidden_size, shape.intermediate_size
    plain = vram.estimate(shape, unsloth_run(8192))
    liger = vram.estimate(shape, unsloth_run(8192), liger_kernels=True)
    # norms: the input as it is plus an fp32 rstd (not an fp32 copy); SwiGLU: gate and up
    # (not silu(gate) too); its backward writes into them (2 x intermediate, not 3).
    saved = 2 * (4 * h - (c * h + 4)) + c * i
    assert plain.part("activations") - liger.part("activations") == 8192 * (saved + c * i)
    assert liger.host_bytes == 0
    assert liger.part("logits") == plain.part("logits")  # the loss head is TRL's either way


def test_the_options_change_nothing_on_a_cpu_estimate() -> None:
    shape = vram.model_shape(LLAMA_8B)
    plain = vram.estimate(shape, unsloth_run(4096), device="cpu")
    asked = vram.estimate(shape, unsloth_run(4096), device="cpu",
                          offload_activations=True, liger_kernels=True)  # fmt: skip
    assert asked.total_bytes == plain.total_bytes
    assert not asked.activation_offloading and not asked.liger_kernels


# --- the choice -------------------------------------------------------------------------------


def choose(seq_len: int, caps: longctx.Capabilities = GAMING_PC, **changes):
    shape = vram.model_shape(LLAMA_8B)
    return longctx.choose(shape, unsloth_run(seq_len, **changes), caps, capacity_bytes=CARD_12GB)


def test_auto_turns_both_on_when_the_fit_check_says_tight_and_says_so() -> None:
    chosen = choose(8192)  # "tight" without them
    assert chosen.offload.on and chosen.liger.on
    assert "tight" in chosen.liger.reason
    assert chosen.estimate.verdict == "fits"
    assert chosen.to_dict()["activation_offloading_reason"] == chosen.offload.reason


def test_auto_turns_offloading_on_when_it_would_not_fit() -> None:
    chosen = choose(14_336)
    assert "won't fit" in chosen.offload.reason and chosen.offload.on
    assert chosen.estimate.verdict != "won't fit"


def test_auto_leaves_both_off_when_the_run_fits() -> None:
    chosen = choose(2048)
    assert not chosen.offload.on and not chosen.liger.on
    assert "not needed" in chosen.offload.reason


def test_liger_first_then_offloading_only_if_still_short() -> None:
    # At 7k tokens Liger alone brings the run back to "fits": no offloading (it costs speed).
    chosen = choose(7168)
    assert chosen.liger.on and not chosen.offload.on, chosen.lines()
    assert "tight" in chosen.liger.reason and chosen.offload.reason.startswith("auto: not needed")


def test_without_liger_kernel_installed_offloading_still_comes_on() -> None:
    caps = longctx.Capabilities(True, True, "ok", False, 24 * GIB)
    chosen = choose(8192, caps)
    assert not chosen.liger.on and "pip install liger-kernel" in chosen.liger.reason
    assert chosen.offload.on


def test_without_triton_liger_stays_off_with_triton_s_reason() -> None:
    caps = longctx.Capabilities(True, False, "no Python.h", True, 24 * GIB)
    chosen = choose(8192, caps)
    assert not chosen.liger.on and "no Python.h" in chosen.liger.reason


def test_auto_tiles_the_mlp_last_when_the_other_two_are_not_enough() -> None:
    chosen = choose(21_848)
    assert chosen.offload.on and chosen.liger.on and chosen.tiled.on, chosen.lines()
    assert "won't fit" in chosen.tiled.reason
    assert chosen.estimate.verdict != "won't fit" and chosen.estimate.tiled_mlp
    assert chosen.to_dict()["tiled_mlp_reason"] == chosen.tiled.reason
    assert chosen.options == vram.Options(True, True, True)
    short = choose(8192)  # offloading and Liger are enough: no extra MLP forward
    assert not short.tiled.on and short.tiled.reason.startswith("auto: not needed")


def test_without_triton_the_tiled_mlp_still_comes_on() -> None:
    """Windows: no Triton, so no Liger; offloading and the tiled MLP are plain PyTorch."""
    caps = longctx.Capabilities(True, False, "Triton is not installed", False, 24 * GIB)
    chosen = choose(16_384, caps)
    assert not chosen.liger.on and chosen.offload.on and chosen.tiled.on, chosen.lines()
    assert chosen.estimate.verdict != "won't fit"


def test_a_multi_gpu_rank_never_tiles_the_mlp() -> None:
    caps = longctx.Capabilities(True, True, "ok", True, 24 * GIB, multi_process=True)
    chosen = choose(21_848, caps, tiled_mlp="on")
    assert not chosen.tiled.on and "multi-GPU" in chosen.tiled.reason
    assert chosen.offload.on


def test_offloading_checks_host_ram() -> None:
    caps = longctx.Capabilities(True, True, "ok", True, 4 * GIB)  # 14k tokens pin 7 GiB
    chosen = choose(14_336, caps)
    assert not chosen.offload.on and "host RAM" in chosen.offload.reason


def test_the_user_overrides_auto() -> None:
    off = choose(8192, activation_offloading="off", liger_kernels="off")
    assert not off.offload.on and not off.liger.on
    assert off.offload.reason == "off in the run's settings"
    on = choose(1024, activation_offloading="on")
    assert on.offload.on and not on.liger.on


def test_on_a_cpu_offloading_is_off_with_the_reason_never_a_crash() -> None:
    caps = longctx.Capabilities(False, False, "", True, 24 * GIB)
    chosen = choose(8192, caps, activation_offloading="on", liger_kernels="on")
    assert not chosen.offload.on and "needs an accelerator" in chosen.offload.reason
    assert not chosen.liger.on and "CPU" in chosen.liger.reason


def test_a_cpu_run_decides_on_this_machine(embedded_model) -> None:
    cfg = RunConfig(activation_offloading="on", liger_kernels="on")
    chosen = longctx.for_run(cfg, str(embedded_model), "cpu")
    assert not chosen.offload.on and "needs an accelerator" in chosen.offload.reason
    assert not chosen.liger.on
    tiled = longctx.for_run(RunConfig(tiled_mlp="on"), str(embedded_model), "cpu")
    assert tiled.tiled.on and tiled.tiled.reason == "on in the run's settings"
    assert not longctx.for_run(RunConfig(tiled_mlp="on"), str(embedded_model), "cpu", True).tiled.on


def test_the_switches_are_validated() -> None:
    with pytest.raises(ConfigError, match="activation_offloading"):
        RunConfig(activation_offloading="yes").validate()
    with pytest.raises(ConfigError, match="liger_kernels"):
        RunConfig.from_dict({"liger_kernels": "maybe"}).validate()
    with pytest.raises(ConfigError, match="tiled_mlp"):
        RunConfig(tiled_mlp=True).validate()
    assert RunConfig().activation_offloading == RunConfig().liger_kernels == "auto"
    assert RunConfig().tiled_mlp == "auto"


# --- SFTConfig and the bench ------------------------------------------------------------------


def test_sftconfig_receives_the_choice(tmp_path: Path) -> None:
    from studio.train import recipe

    on = longctx.LongContext(longctx.Switch(True, "test"), longctx.Switch(True, "test"))
    args = recipe.build_training_args(RunConfig(), tmp_path, "cpu", False, False, long_context=on)
    assert args.activation_offloading and args.use_liger_kernel
    plain = recipe.build_training_args(RunConfig(), tmp_path, "cpu", False, False)
    assert not plain.activation_offloading and not plain.use_liger_kernel


def test_the_gpu_bench_estimates_with_and_without_the_options() -> None:
    from studio.tools.gpu import long_context_section

    found = long_context_section({"device": "cpu"})
    assert found["estimate_longest"] == longest(True, tiled=True)
    assert found["estimate_longest_without_tiled_mlp"] == 15_360
    assert found["estimate_longest_without_options"] == 8192
    assert found["measured_longest"] is None and "needs CUDA" in found["note"]
