"""The speed choices of the training path keep its results: the compact CPU loss head gives
TRL's loss and gradients, batches group rows by length, and the CPU precision follows the CPU.

Speed itself is measured by `python -m studio.bench train`, not asserted here.
"""

from __future__ import annotations

import os

import pytest
import torch

from studio.config import RunConfig
from studio.models import precision
from studio.train import recipe
from studio.train.prepare import tokenize_rows


def test_head_loss_sum_matches_cross_entropy_in_one_piece_and_in_pieces(monkeypatch) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))

    expected = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (want,) = torch.autograd.grad(expected, hidden)
    for values in (10**6, 50 * 8):  # one piece; pieces of 8 tokens, recomputed in backward
        monkeypatch.setattr(recipe, "HEAD_CHUNK_VALUES", values)
        got = recipe.head_loss_sum(hidden, head, targets)
        (grad,) = torch.autograd.grad(got, hidden)
        assert torch.allclose(got, expected, atol=1e-4), (values, got, expected)
        assert torch.allclose(grad, want, atol=1e-5), values


def test_compact_head_is_only_for_plain_heads_on_cpu(monkeypatch) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from studio.hardware import detect

    # a GPU with Triton (without it, CUDA uses the compact head too: test_cuda_decisions)
    monkeypatch.setattr(detect, "triton_ready", lambda **_: detect.Choice(True, "faked"))

    tiny = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64,
    )  # fmt: skip
    model = LlamaForCausalLM(tiny)
    assert recipe.compact_head_ok(model, "cpu")
    assert not recipe.compact_head_ok(model, "cuda")  # TRL's Triton head is compact there
    model.config.final_logit_softcapping = 30.0  # Gemma-style: TRL's head applies it
    assert not recipe.compact_head_ok(model, "cpu")
    assert not recipe.padding_free_ok(model)  # SDPA: padded batches, no flattened mask
    model.config._attn_implementation = "flash_attention_2"
    assert recipe.padding_free_ok(model)


def test_batches_are_length_grouped_unless_padding_free_or_packed(tmp_path) -> None:
    cfg = RunConfig(max_steps=2)
    grouped = recipe.build_training_args(cfg, tmp_path, "cpu", False, False)
    assert grouped.train_sampling_strategy == "group_by_length" and not grouped.padding_free
    free = recipe.build_training_args(cfg, tmp_path, "cpu", False, False, padding_free=True)
    assert free.train_sampling_strategy == "random" and free.padding_free
    packed = recipe.build_training_args(cfg.replace(packing=True), tmp_path, "cpu", False, False)
    assert packed.packing and packed.train_sampling_strategy == "random"


def test_cpu_precision_follows_the_cpu_and_the_override(monkeypatch, tmp_path) -> None:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    # LORA_STUDIO_CPU_NO_BF16 (the suite's fp32 mode) hides the flags, as on a CPU without them
    hidden = os.environ.get(precision.CPU_NO_BF16_ENV, "") not in ("", "0")
    native = ("avx512_bf16" in flags or "amx_bf16" in flags) and not hidden
    monkeypatch.delenv("LORA_STUDIO_CPU_FP32", raising=False)
    assert precision.cpu_bf16()[0] is native
    chosen = precision.precision("cpu")
    assert chosen.torch_dtype == (torch.bfloat16 if native else torch.float32) and chosen.reason
    args = recipe.build_training_args(RunConfig(max_steps=1), tmp_path, "cpu", False, False)
    assert args.bf16 is native and not args.fp16
    monkeypatch.setenv("LORA_STUDIO_CPU_FP32", "1")
    assert precision.precision("cpu").torch_dtype == torch.float32
    assert "LORA_STUDIO_CPU_FP32" in precision.precision("cpu").reason


# How far two gradients may differ, as ||got - want|| / ||want|| per tensor. The two heads sum
# the same terms in a different order. In fp32 that moved single elements by more than 1e-3 of
# their value on a CPU without AVX-512 (an element test failed there), and whole tensors by
# 1.1e-4 (measured on an AVX512-BF16 CPU). Under bf16 autocast the heads round differently
# (TRL's takes bf16 logits of the whole vocabulary): 2.5e-2 measured there.
GRAD_TOLERANCE = {"fp32": 1e-3, "bf16": 1e-1}


def gradient_mismatch(grads: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The worst relative error of a whole gradient tensor (a norm, not element by element)."""
    worst = 0.0
    for g, w in zip(grads, want, strict=True):
        scale = float(w.double().norm()) or 1.0
        worst = max(worst, float((g.double() - w.double()).norm()) / scale)
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_compact_head_gives_trls_loss_and_gradients_on_the_embedded_model(
    kind, embedded_model, tokenizer, monkeypatch, tmp_path
) -> None:
    """One padded batch of real conversations through both heads of the real trainer, in fp32
    (forced) and in bf16 where this CPU has native bf16; a wrong head must fail the same check."""
    if kind == "fp32":
        monkeypatch.setenv(precision.CPU_FP32_ENV, "1")
    elif not precision.cpu_bf16()[0]:
        pytest.skip(f"needs a CPU with native bf16 ({precision.cpu_bf16()[1]})")
    cfg = RunConfig(base_model=str(embedded_model.path), max_seq_len=128, batch_size=3,
                    max_steps=1, target_modules="qv", lora_dropout=0.0, device="cpu")  # fmt: skip
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [
            ("Where is my parcel 123?", "It left the depot today."),
            ("Tôi quên mật khẩu.", "Bạn hãy bấm 'Quên mật khẩu' để đặt lại."),
            ("สวัสดีครับ", "สวัสดีครับ ยินดีให้บริการ"),
        ]
    ]
    tokenized, _ = tokenize_rows(tokenizer, rows, cfg)
    model = recipe.load_base_model(cfg, embedded_model.path, "cpu")
    args = recipe.build_training_args(cfg, tmp_path, "cpu", False, False)
    assert args.bf16 is (kind == "bf16")
    trainer = recipe.build_trainer(cfg, model, tokenizer, args, "cpu", tokenized)
    assert trainer.compact_head  # on CPU, for a plain head
    batch = trainer._prepare_inputs(trainer.data_collator(tokenized))
    assert batch["attention_mask"].eq(0).any()  # rows of different length: padded
    lora = [p for p in trainer.model.parameters() if p.requires_grad]

    seen: list[int] = []  # what a hook on the model's forward sees (the progress callback's)
    trainer.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(int(kw["labels"].ne(-100).sum())), with_kwargs=True
    )

    def loss_and_grads(compact: bool, inputs=batch, scale: float = 1.0):
        trainer.compact_head = compact
        with trainer.accelerator.autocast():  # bf16 autocast where the run uses it
            loss = trainer.compute_loss(trainer.model, dict(inputs)) * scale
        return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, lora)]

    trl_loss, trl_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert 0.5 < float(loss) < 10
    assert torch.allclose(loss, trl_loss, rtol=1e-4 if kind == "fp32" else 2e-3), (loss, trl_loss)
    tolerance = GRAD_TOLERANCE[kind]
    mismatch = gradient_mismatch(grads, trl_grads)
    assert mismatch < tolerance, f"{kind}: gradients differ by {mismatch:.2e} (norm)"
    assert any(g.abs().sum() > 0 for g in grads)
    assert len(seen) == 2 and seen[0] == seen[1] == int(batch["labels"].ne(-100).sum())

    # The same comparison tells a wrong head: labels shifted by one token, or a loss scaled
    # by 10 tolerances (a sum divided by the wrong token count).
    shifted = dict(batch, labels=batch["labels"].roll(1, dims=1))
    off = gradient_mismatch(loss_and_grads(True, shifted)[1], trl_grads)
    scaled = gradient_mismatch(loss_and_grads(True, scale=1 + 10 * tolerance)[1], trl_grads)
    assert off > 3 * tolerance and scaled > 3 * tolerance, (off, scaled)


def test_a_batch_without_labels_sums_to_zero() -> None:
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(0, 8, requires_grad=True)
    total = recipe.head_loss_sum(hidden, head, torch.zeros(0, dtype=torch.long))
    assert float(total.detach()) == 0.0
    total.backward()  # still connected to the model: backward() does not fail


def test_qlora_adapters_are_fp32_unless_training_in_bf16() -> None:
    """fp16 cards (RTX 20xx, T4): TRL's bf16 adapters crash the fp16 GradScaler."""
    from types import SimpleNamespace

    qlora, lora = RunConfig(method="qlora"), RunConfig(method="lora")
    fp16 = SimpleNamespace(bf16=False, fp16=True)
    assert recipe.adapters_need_fp32(qlora, fp16)
    assert recipe.adapters_need_fp32(qlora, SimpleNamespace(bf16=False, fp16=False))
    assert not recipe.adapters_need_fp32(qlora, SimpleNamespace(bf16=True, fp16=False))
    assert not recipe.adapters_need_fp32(lora, fp16)


def test_label_count_waits_for_the_log_not_each_micro_batch() -> None:
    """`int()` on a GPU tensor syncs the host every micro-batch; `meta` stands in for a GPU:
    reading it to the host raises, so the hook must not."""
    import threading
    from types import SimpleNamespace

    from studio.train.loop import _Progress

    progress = _Progress(
        SimpleNamespace(device="cuda", power_w=0.0), lambda e: None, threading.Event()
    )
    module = SimpleNamespace(training=True)
    labels = torch.tensor([[-100, 5, 6], [7, -100, -100]], device="meta")
    progress._count_labels(module, (), {"labels": labels})  # no host read here
    progress._labels_pending = None
    for _ in range(3):
        progress._count_labels(module, (), {"labels": torch.tensor([[-100, 5, 6], [7, -100, 9]])})
    assert progress.label_tokens == 12
    assert progress.label_tokens == 12  # read twice: counted once


@pytest.mark.parametrize(
    ("total", "rows_per_step", "val_rows", "interval"),
    [
        (21, 4, 30, 21),  # bench uipath: 7 evals of 30 rows were half the run; now the last only
        (41, 4, 18, 10),  # the default first run: 4 evals (plus step 0 and the last step)
        (500, 16, 100, 100),  # a GPU run: evals are cheap next to training, about 5
        (40, 4, 0, 8),  # no validation rows: the plain ~5 per run
    ],
)
def test_evals_stay_a_small_share_of_the_run(
    total: int, rows_per_step: int, val_rows: int, interval: int
) -> None:
    from studio.train.recipe import eval_interval

    assert eval_interval(total, rows_per_step, val_rows) == interval


def test_an_eval_interval_the_user_set_wins() -> None:
    from studio.config import RunConfig
    from studio.train.recipe import plan_steps

    cfg = RunConfig(max_steps=21, batch_size=4, grad_accum=1, eval_steps=3)
    assert plan_steps(cfg, 100, val_rows=30)["eval_steps"] == 3
    assert (
        plan_steps(RunConfig(max_steps=21, batch_size=4, grad_accum=1), 100, 30)["eval_steps"] == 21
    )


@pytest.mark.slow
def test_trls_fused_head_loss_without_its_host_syncs(tmp_path, monkeypatch, embedded_model) -> None:
    """Issue 25, item 10: TRL reads entropy, token accuracy and a token count back to the host
    after each micro-batch (`.item()`); the studio's training step takes TRL's fused-head loss
    without them. Same loss and gradients as TRL's own compute_loss, and no `.item()`."""
    from trl import SFTTrainer

    from studio.models import tiny
    from studio.models.loader import load_tokenizer

    monkeypatch.setenv("LORA_STUDIO_CPU_FP32", "1")
    model_dir = tiny.build_model("llama", tmp_path / "tiny", dtype="float32")
    cfg = RunConfig(base_model=str(model_dir), max_seq_len=64, batch_size=2, max_steps=1,
                    target_modules="qv", lora_dropout=0.0, device="cpu")  # fmt: skip
    tok = load_tokenizer(model_dir)
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [("Xin chào", "Chào bạn, tôi giúp gì được?"), ("สวัสดี", "ยินดีครับ")]
    ]
    tokenized, _ = tokenize_rows(tok, rows, cfg)
    model = recipe.load_base_model(cfg, model_dir, "cpu")
    args = recipe.build_training_args(cfg, tmp_path / "run", "cpu", False, False)
    trainer = recipe.build_trainer(cfg, model, tok, args, "cpu", tokenized)
    trainer.compact_head = False  # TRL's fused head, as on a GPU with Triton
    trainer.model.train()
    batch = trainer._prepare_inputs(trainer.data_collator(tokenized))
    lora = [p for p in trainer.model.parameters() if p.requires_grad]
    reads: list[int] = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or item(t))

    def loss_and_grads(compute) -> tuple[torch.Tensor, list[torch.Tensor]]:
        reads.clear()
        loss = compute(trainer, trainer.model, dict(batch))
        return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, lora)], len(reads)

    trl_loss, trl_grads, trl_reads = loss_and_grads(SFTTrainer.compute_loss)
    loss, grads, own_reads = loss_and_grads(type(trainer).compute_loss)
    assert trl_reads >= 3 and own_reads == 0
    assert torch.allclose(loss, trl_loss, rtol=1e-5), (loss, trl_loss)
    for g, want in zip(grads, trl_grads, strict=True):
        assert torch.allclose(g, want, rtol=1e-4, atol=1e-7)
