"""VRAM estimate: each part against hand computations, the verdict, auto-fit and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from studio.config import ConfigError
from studio.hardware import vram
from studio.plots import vram_figure

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


def test_qwen_05b_in_bf16_by_hand() -> None:
    """Qwen2.5-0.5B's published config.json, counted by hand, at 2 bytes per parameter.

    hidden 896, intermediate 4864, 24 layers, 14 heads of 64, 2 KV heads (k/v width 128),
    vocab 151,936 with tied embeddings, biases on q/k/v. Per layer:
      q 896x896 + o 896x896                 = 1,605,632
      k 896x128 + v 896x128                 =   229,376
      gate, up, down 3 x 896x4864           = 13,074,432
      q/k/v biases 896 + 128 + 128          =     1,152
      two RMSNorms 2 x 896                  =     1,792
                                             = 14,912,384 x 24 layers = 357,897,216
    embeddings 151,936 x 896 = 136,134,656, final norm 896: 494,032,768 parameters,
    x 2 bytes (bf16) = 988,065,536.
    """
    shape = vram.model_shape(QWEN_05B)
    assert shape.n_params == 494_032_768
    assert vram.estimate(shape, settings()).part("base") == 988_065_536
    assert vram.estimate(shape, settings(), device="cpu").part("base") == 1_976_131_072  # fp32


def test_qwen_05b_lora_on_q_and_v_by_hand() -> None:
    """r=16 on q_proj and v_proj of Qwen2.5-0.5B, LoRA on CUDA with paged 8-bit AdamW.

    Trainable values: q 16 x (896 + 896) = 28,672, v 16 x (896 + 128) = 16,384; 45,056 per
    layer x 24 = 1,081,344 (what peft's print_trainable_parameters says).
    Bytes: fp32 adapters and fp32 gradients: 1,081,344 x 8 = 8,650,752. Optimizer: bitsandbytes
    keeps tensors under 4096 values in 32-bit states; v's lora_B (16 x 128 = 2,048) is one:
    2,048 x 2 states x 4 B = 16,384. The other three (16 x 896 = 14,336 values each) are 8-bit:
    2 x 14,336 + 2 states x 4 B x 56 blocks of 256 = 29,120 each, 87,360 for three.
    Per layer 103,744 x 24 = 2,489,856. Total 8,650,752 + 2,489,856 = 11,140,608.
    """
    shape = vram.model_shape(QWEN_05B)
    assert vram.lora_param_count(shape, "qv", 16) == 1_081_344
    est = vram.estimate(shape, settings(target_modules="qv"))
    assert est.trainable_params == 1_081_344
    assert est.part("lora") == 11_140_608


def test_llama_8b_qlora_base_weights_by_hand() -> None:
    """About 5.7 GB: NF4 decoder linears plus 16-bit embeddings, lm_head and norms.

    Llama-3.1-8B: hidden 4096, intermediate 14336, 32 layers, 8 KV heads of 128 (k/v 1024).
    Linear weights per layer: q, o 2 x 4096^2 + k, v 2 x 4096 x 1024 + gate, up, down
    3 x 4096 x 14336 = 218,103,808; x 32 = 6,979,321,856.
    NF4 with double quantization: 0.5 B codes + one 8-bit absmax per 64 (1/64 B) + one fp32
    scale per 256 blocks (4/16384 B) = 0.515869140625 B: 3,600,416,768; plus 224 tensors x
    1,088 B of code table and quant state = 243,712.
    16-bit: embeddings and the untied head 2 x 128,256 x 4096 + norms 65 x 4096 = 1,050,939,392
    values x 2 B = 2,101,878,784. Total 5,702,539,264.
    """
    shape = vram.model_shape(LLAMA_8B)
    assert shape.linear_params == 6_979_321_856
    assert vram.estimate(shape, settings(method="qlora")).part("base") == 5_702_539_264
    lora = vram.estimate(shape, settings(method="lora"))
    assert lora.part("base") == 16_060_522_496  # 8,030,261,248 x 2 B (bf16)


def test_llama_8b_lora_part_by_hand() -> None:
    """r=16 on all linear layers of Llama-3.1-8B: peft reports 41,943,040 trainable values.

    Per layer: 16 x ((4096 + 4096) x 2 [q, o] + (4096 + 1024) x 2 [k, v] + (4096 + 14336) x 3
    [gate, up, down]) = 16 x 81,920 = 1,310,720; x 32 = 41,943,040.
    QLoRA: TRL casts the adapters to bf16, so weights and gradients take 2 + 2 B: 167,772,160.
    8-bit AdamW: every A/B matrix has >= 4096 values and a multiple of 256, so 2 B of states
    per value + 2 x 4 B per 256: 83,886,080 + 1,310,720. Total 252,968,960.
    LoRA with adamw_torch: fp32 weights, gradients and two moments, 16 B each: 671,088,640.
    """
    shape = vram.model_shape(LLAMA_8B)
    assert vram.lora_param_count(shape, "all_linear", 16) == 41_943_040
    assert vram.lora_param_count(shape, "qv", 8) == 3_407_872  # 32 x 8 x (8192 + 5120)
    assert vram.estimate(shape, settings(method="qlora")).part("lora") == 252_968_960
    assert vram.estimate(shape, settings(optimizer="adamw_torch")).part("lora") == 671_088_640


def test_activations_by_hand() -> None:
    """SmolLM2-135M, LoRA r=8 on q/v without dropout, one row of 256 tokens, on CUDA.

    hidden 576, intermediate 1536, 30 layers, 9 heads of 64, 3 KV heads (k/v 192), bf16.
    What one layer keeps per token:
      RMSNorm inputs in fp32, twice: 2 x 4 x 576                     =  4,608
      attention q, k, v, output in bf16 + fp32 log-sum-exp per head:
        2 x (576 + 192 + 192 + 576) + 4 x 9                          =  3,108
      SwiGLU gate, silu(gate), up: 3 x 2 x 1536                      =  9,216
      LoRA on q and v: the bf16 cast of the input 2 x 576 and
        lora_A's output 2 x 8, twice                                 =  2,336
                                                                       19,268
    Backward buffers of one layer: 3 x 2 x 1536 + 3 x 4 x 576 = 16,128. Once per token:
    final norm 4 x 576 + rope cos/sin 2 x 64 x 2 + the batch's int64 tensors 40 = 2,600.
    Without checkpointing: 256 x (30 x 19,268 + 16,128 + 2,600) = 152,772,608. Autocast keeps
    a bf16 copy of the fp32 adapters: 30 x 8 x (1152 + 768) = 460,800 values x 2 B = 921,600.
    Total 153,694,208.
    With checkpointing each layer keeps only its bf16 input (2 x 576 = 1,152 B) and one layer
    is recomputed: 256 x (30 x 1,152 + 19,268 + 16,128 + 2,600) + 921,600 = 19,495,936.
    """
    shape = vram.model_shape(SMOL)
    s = settings(target_modules="qv", lora_r=8, lora_dropout=0.0, max_seq_len=256)
    assert vram.estimate(shape, s).part("activations") == 153_694_208
    checkpointed = vram.estimate(shape, {**s, "gradient_checkpointing": True})
    assert checkpointed.part("activations") == 19_495_936


def test_logits_without_the_fused_head_dominate_small_qwen() -> None:
    """A 152k vocabulary: fp32 logits plus their gradient are the largest part.

    Qwen2.5-0.5B, 2 rows of 1024 tokens = 2,048 tokens. Classic loss: bf16 logits and their
    fp32 log-softmax are kept, 2,048 x 151,936 x (2 + 4) = 1,867,038,720, and backward adds
    two fp32 gradients of the same size (2,489,384,960), less what the layers' backward
    buffers already hold. TRL's chunked head keeps only the bf16 hidden states of the scored
    tokens, 2,048 x 896 x 2 = 3,670,016: its fp32 gradient and 2,048 x 32,768 tiles (145 MB)
    fit inside the layers' backward buffers (the recomputed layer alone is ~150 MB here).
    """
    shape = vram.model_shape(QWEN_05B)
    s = settings(batch_size=2, max_seq_len=1024, gradient_checkpointing=True)
    classic = vram.estimate(shape, s, fused_lm_head=False)
    assert 1_867_038_720 + 2_000_000_000 < classic.part("logits") < 1_867_038_720 + 2_489_384_960
    assert max(classic.parts, key=lambda p: p.bytes).key == "logits"
    fused = vram.estimate(shape, s)  # TRL's chunked head never builds the logits
    assert fused.part("logits") == 3_670_016


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
    assert cpu.part("base") == 1_976_131_072  # 494,032,768 parameters x 4 B (fp32)
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


def test_reference_models_are_checked_data(tmp_path: Path) -> None:
    """reference_models.yaml loads into the configs; a typo there names the model and field."""
    assert vram.REFERENCE_FILE.parent == Path(vram.__file__).parent
    assert vram.load_reference_configs() == vram.REFERENCE_CONFIGS
    assert vram.REFERENCE_CONFIGS[QWEN_05B]["rms_norm_eps"] == 1e-6  # a float, not "1e-6"
    good = yaml.safe_dump({"org/tiny": vram.REFERENCE_CONFIGS[SMOL]})
    path = tmp_path / "models.yaml"
    path.write_text(good.replace("rms_norm_eps: 1.0e-05", "rms_norm_eps: 1e-5"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"org/tiny\.rms_norm_eps: expected a float"):
        vram.load_reference_configs(path)
    path.write_text(good.replace("vocab_size", "vocab"), encoding="utf-8")
    with pytest.raises(ValueError, match=r"org/tiny: unknown fields \['vocab'\], missing fields"):
        vram.load_reference_configs(path)


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
    fig = vram_figure(est, 12.0)
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
