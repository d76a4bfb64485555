"""VRAM estimate: each part against hand computations, the verdict, auto-fit and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from studio.config import ConfigError
from studio.hardware import vram

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
QWEN_05B = "Qwen/Qwen2.5-0.5B-Instruct"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def settings(**changes: object) -> dict:
    base = {
        "method": "lora",
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": "all_linear",
        "max_seq_len": 1024,
        "batch_size": 1,
        "grad_accum": 1,
        "gradient_checkpointing": False,
        "optimizer": "paged_adamw_8bit",
    }
    return {**base, **changes}


def test_parameter_counts_match_the_published_ones() -> None:
    """The shapes read from config reproduce the models' published parameter counts."""
    assert vram.model_shape(SMOL).n_params == 134_515_008
    assert vram.model_shape(QWEN_05B).n_params == 494_032_768
    assert vram.model_shape("Qwen/Qwen2.5-7B-Instruct").n_params == 7_615_616_512
    assert vram.model_shape(LLAMA_8B).n_params == 8_030_261_248


def test_llama_8b_qlora_base_weights_by_hand() -> None:
    """About 5.7 GB: NF4 decoder linears plus 16-bit embeddings and lm_head."""
    h, i, layers, kv, vocab = 4096, 14336, 32, 8 * 128, 128256
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)  # q, o; k, v; gate, up, down
    assert linear == 6_979_321_856
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # codes, 8-bit absmax per 64, fp32 scale per 256 blocks
    sixteen_bit = 2 * vocab * h + (2 * layers + 1) * h  # embeddings + untied lm_head + norms
    by_hand = linear * nf4 + 2 * sixteen_bit
    est = vram.estimate(vram.model_shape(LLAMA_8B), settings(method="qlora"))
    assert est.part("base") == pytest.approx(by_hand, rel=1e-3)
    assert 5.6e9 < est.part("base") < 5.8e9
    lora = vram.estimate(vram.model_shape(LLAMA_8B), settings(method="lora"))
    assert lora.part("base") == 2 * 8_030_261_248  # bf16


def test_lora_part_by_hand() -> None:
    """r=16 on all linear layers of Llama-3.1-8B: peft reports 41,943,040 trainable values."""
    shape = vram.model_shape(LLAMA_8B)
    assert vram.lora_param_count(shape, "all_linear", 16) == 41_943_040
    assert vram.lora_param_count(shape, "qv", 8) == 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    n = 41_943_040
    qlora = vram.estimate(shape, settings(method="qlora"))
    # bf16 adapters (TRL casts them for QLoRA), bf16 grads, 8-bit states with fp32 absmax
    assert qlora.part("lora") == pytest.approx(n * (2 + 2 + 2 + 8 / 256), rel=1e-3)
    lora = vram.estimate(shape, settings(optimizer="adamw_torch"))
    assert lora.part("lora") == n * (4 + 4 + 8)  # fp32 adapters, grads, two fp32 moments


def test_activations_by_hand() -> None:
    """SmolLM2-135M, LoRA on q/v without dropout, one row of 256 tokens, on CUDA."""
    h, i, layers, c = 576, 1536, 30, 2
    norms = 2 * 4 * h  # RMSNorm keeps an fp32 copy of its input, twice per layer
    attention = c * (576 + 192 + 192 + 576) + 4 * 9  # q, k, v (3 KV heads), output, lse
    mlp = 3 * c * i  # gate, silu(gate), up
    lora = 2 * (c * h + c * 16 // 2)  # q and v: bf16 cast of the input + lora_A's r=8 output
    layer = norms + attention + mlp + lora
    assert layer == 19_268
    backward = 3 * c * i + 3 * 4 * h
    once = 4 * h + 2 * 64 * c + 40  # final norm, rope cos/sin, the batch's int64 tensors
    shape = vram.model_shape(SMOL)
    s = settings(target_modules="qv", lora_r=8, lora_dropout=0.0, max_seq_len=256)
    cached = c * layers * 8 * ((h + h) + (h + 192))  # autocast's bf16 copies of the adapters
    est = vram.estimate(shape, s)
    assert est.part("activations") == 256 * (layers * layer + backward + once) + cached
    checkpointed = vram.estimate(shape, {**s, "gradient_checkpointing": True})
    assert checkpointed.part("activations") == (
        256 * (layers * c * h + layer + backward + once) + cached
    )
    assert checkpointed.part("activations") < est.part("activations") / 7


def test_logits_without_the_fused_head_dominate_small_qwen() -> None:
    """A 152k vocabulary: fp32 logits plus their gradient are the largest part."""
    shape = vram.model_shape(QWEN_05B)
    s = settings(batch_size=2, max_seq_len=1024, gradient_checkpointing=True)
    classic = vram.estimate(shape, s, fused_lm_head=False)
    tokens = 2 * 1024
    assert classic.part("logits") >= tokens * 151936 * 4 * 2
    assert max(classic.parts, key=lambda p: p.bytes).key == "logits"
    fused = vram.estimate(shape, s)  # TRL's chunked head never builds the logits
    tile = 2048 * 32768 * 2
    assert fused.part("logits") <= tokens * 896 * (2 + 4 + 2) + tile
    assert fused.part("logits") < classic.part("logits") / 10


def test_scaling_and_overhead() -> None:
    shape = vram.model_shape(QWEN_05B)
    one = vram.estimate(shape, settings(batch_size=1))
    four = vram.estimate(shape, settings(batch_size=4))
    # Padded rows share one (rows x S x S) mask: booleans, plus an additive bf16 copy per layer.
    masks = 4 * 1024**2 + 24 * 4 * 1024**2 * 2
    assert four.tokens_per_step == 4 * 1024
    # A bit over 4x: with a mask, SDPA gets k/v repeated to every head (GQA).
    assert 4.0 < (four.part("activations") - masks) / one.part("activations") < 4.5
    checkpointed = vram.estimate(shape, settings(batch_size=4, gradient_checkpointing=True))
    # Checkpointing keeps the 24 layer inputs and one recomputed layer (with its mask copy).
    layer_inputs = 4096 * 24 * 896 * 2
    assert layer_inputs < checkpointed.part("activations") < four.part("activations") / 3
    assert one.part("overhead") >= vram.CUDA_CONTEXT
    assert one.total_bytes == sum(p.bytes for p in one.parts)
    cpu = vram.estimate(shape, settings(optimizer="adamw_torch"), device="cpu")
    assert cpu.part("base") == 4 * shape.n_params  # fp32 on CPU
    with pytest.raises(ConfigError, match="batch_size"):
        vram.estimate(shape, settings(batch_size=0))


def test_verdict_thresholds() -> None:
    est = vram.estimate(vram.model_shape(SMOL), settings())
    total = est.total_bytes
    assert vram.verdict_for(total, int(total / 0.89)) == "fits"
    assert vram.verdict_for(total, int(total / 0.95)) == "tight"
    assert vram.verdict_for(total, total - 1) == "won't fit"
    assert vram.verdict_for(total, None) == "unknown"
    placed = vram.estimate(
        vram.model_shape(SMOL), settings(), capacity_bytes=total + 100, in_use_bytes=200
    )
    assert placed.available_bytes == total - 100
    assert placed.verdict == "won't fit"


def test_auto_fit_keeps_the_effective_batch() -> None:
    shape = vram.model_shape(QWEN_05B)
    card = 8 * vram.GIB
    start = settings(batch_size=16, grad_accum=1, max_seq_len=2048)
    assert vram.estimate(shape, start, capacity_bytes=card).verdict == "won't fit"
    fit = vram.auto_fit(shape, start, capacity_bytes=card, in_use_bytes=vram.TYPICAL_DESKTOP_USE)
    s = fit.settings
    assert fit.fits and fit.estimate.verdict == "fits"
    assert s["batch_size"] < 16 and s["batch_size"] * s["grad_accum"] >= 16
    assert s["max_seq_len"] == 2048  # batch first: the rows stay whole
    assert fit.estimate.total_bytes <= 0.9 * (card - vram.TYPICAL_DESKTOP_USE)
    bigger = vram.estimate(
        shape,
        {**s, "batch_size": s["batch_size"] * 2},
        capacity_bytes=card,
        in_use_bytes=vram.TYPICAL_DESKTOP_USE,
    )
    assert bigger.verdict != "fits"  # the largest batch that fits
    assert any("batch_size 16 →" in c for c in fit.changes)


def test_auto_fit_cuts_sequence_length_then_gives_up() -> None:
    shape = vram.model_shape("Qwen/Qwen2.5-7B-Instruct")
    start = settings(method="qlora", max_seq_len=8192, batch_size=1, grad_accum=16)
    fit = vram.auto_fit(shape, start, capacity_bytes=8 * vram.GIB, in_use_bytes=vram.GIB)
    assert fit.fits and fit.settings["gradient_checkpointing"] is True
    assert fit.settings["max_seq_len"] < 8192
    hopeless = vram.auto_fit(
        vram.model_shape(LLAMA_8B), settings(method="lora"), capacity_bytes=8 * vram.GIB
    )
    assert not hopeless.fits and "QLoRA" in hopeless.message()


def test_model_shape_sources(tmp_path: Path) -> None:
    assert vram.model_shape("Qwen2.5-7B").name == "Qwen/Qwen2.5-7B-Instruct"
    folder = tmp_path / "my-model"
    folder.mkdir()
    config = {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 1000,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps({"text_config": config}), encoding="utf-8")
    shape = vram.model_shape(str(folder))
    assert shape.num_kv_heads == 4 and shape.head_dim == 64
    assert shape.n_params == 2 * (4 * 256 * 256 + 3 * 256 * 512) + 2 * 1000 * 256 + 5 * 256
    assert "config.json at" in shape.source
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(vram.ModelShapeError, match=r"no config\.json"):
        vram.model_shape(str(empty))
    with pytest.raises(vram.ModelShapeError, match="pick a listed model"):
        vram.model_shape("nobody/not-a-model-xyz")
    moe = {**config, "num_local_experts": 8}
    (folder / "config.json").write_text(json.dumps(moe), encoding="utf-8")
    with pytest.raises(vram.ModelShapeError, match="mixture-of-experts"):
        vram.model_shape(str(folder))


def test_figure_stacks_parts_against_the_card() -> None:
    est = vram.estimate(
        vram.model_shape(SMOL), settings(), capacity_bytes=12 * vram.GIB, in_use_bytes=vram.GIB
    )
    fig = vram.vram_figure(est, 12.0)
    names = [trace.name for trace in fig.data]
    assert names[0].startswith("Already in use") and len(names) == 6
    assert sum(trace.x[0] for trace in fig.data) == pytest.approx(
        (est.total_bytes + vram.GIB) / vram.GIB
    )
    assert any(shape.x0 == 12.0 for shape in fig.layout.shapes)
    assert est.verdict in fig.layout.title.text


def test_cli_prints_parts(capsys: pytest.CaptureFixture[str]) -> None:
    assert vram.main([LLAMA_8B, "--method", "qlora", "--card-gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "Base weights" in out and "fits" in out
    assert vram.main(["nobody/none"]) == 2


def test_measure_without_gpu_says_so_and_exits_0() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "studio.hardware.calibrate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the calibration itself would run")
    assert done.returncode == 0, done.stderr
    assert "A CUDA GPU is needed" in done.stdout
