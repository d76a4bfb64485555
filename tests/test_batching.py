"""Base and fine-tune rows in one batch (`studio.models.batching.adapter_rows`), on a tiny
random-weight Llama with a random (non-zero) LoRA adapter: each row must read exactly what
it reads alone, by either switch, and the model must come back as it was."""

from __future__ import annotations

import pytest

from studio.models import batching


def _tiny_peft(modules_to_save: list[str] | None = None, vocab: int = 97):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = transformers.LlamaForCausalLM(config).eval()
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        init_lora_weights=False,  # random B: the adapter changes every logit
        modules_to_save=modules_to_save,
    )
    return get_peft_model(base, lora).eval()


def _alone(model, ids):
    import torch

    with torch.inference_mode():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        return base, model(input_ids=ids).logits


def test_per_row_scaling_gives_each_row_what_it_reads_alone() -> None:
    import torch

    model = _tiny_peft()
    ids = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(1))
    base, tuned = _alone(model, ids)
    assert not torch.allclose(base, tuned)
    with torch.inference_mode(), batching.adapter_rows(model, [False, True, False]) as extra:
        assert "adapter_names" not in extra  # the per-row scaling path: no PEFT sub-batches
        mixed = model(input_ids=ids).logits
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[2], base[2])
    assert torch.equal(mixed[1], tuned[1])
    # the scaling is the model's own again: the adapter applies to every row
    assert torch.equal(_alone(model, ids)[1], tuned)


def test_the_model_is_restored_when_generation_fails() -> None:
    from peft.tuners.lora import LoraLayer

    model = _tiny_peft()
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    before = dict(layer.scaling)
    with pytest.raises(RuntimeError), batching.adapter_rows(model, [True, False]):
        assert not isinstance(layer.scaling["default"], float)
        raise RuntimeError("generate failed")
    assert layer.scaling == before


def test_an_adapter_with_modules_to_save_uses_peft_mixed_batches() -> None:
    """modules_to_save (here the LM head) is not a LoRA layer: scaling cannot switch it per
    row, so the batch goes through PEFT's `adapter_names`."""
    import torch

    model = _tiny_peft(modules_to_save=["lm_head"])
    with torch.no_grad():  # a saved head that differs from the base's
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    base, tuned = _alone(model, ids)
    with torch.inference_mode(), batching.adapter_rows(model, [True, False]) as extra:
        assert extra == {"adapter_names": ["default", batching.MIXED_BASE]}
        mixed = model(input_ids=ids, **extra).logits
    torch.testing.assert_close(mixed[0], tuned[0])
    torch.testing.assert_close(mixed[1], base[1])


def test_once_the_fine_tuned_rows_end_the_base_rows_go_on_without_lora() -> None:
    """A fine-tune that answers short leaves the base row writing alone: from then on the
    LoRA layers are off (cheaper steps), and the base row's tokens are still its own."""
    import torch

    model = _tiny_peft()
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(5))
    greedy = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        tuned_alone = model.generate(input_ids=ids[1:], **greedy)[0, 6:].tolist()
        with model.disable_adapter():
            base_alone = model.generate(input_ids=ids[:1], **greedy)[0, 6:].tolist()
    # an end token the fine-tuned row writes early and the base row never writes
    end = next(t for t in tuned_alone[3:8] if t not in base_alone and t not in tuned_alone[:3])
    stop = tuned_alone.index(end)
    with torch.inference_mode(), batching.adapter_rows(model, [False, True], {end}) as extra:
        out = model.generate(input_ids=ids, eos_token_id=[end], **greedy, **extra)
        (tail,) = extra["logits_processor"]
        assert tail.off  # the steps after the fine-tune's end ran without LoRA
    assert out[0, 6:].tolist() == base_alone
    assert out[1, 6 : 6 + stop + 1].tolist() == tuned_alone[: stop + 1]
    assert _alone(model, ids)[1].equal(_alone(_tiny_peft(), ids)[1])  # LoRA back on


@pytest.mark.parametrize("family", ["Qwen2MoeConfig", "Qwen3MoeConfig", "MixtralConfig"])
def test_a_mixture_of_experts_model_answers_one_side_after_the_other(family: str) -> None:
    """Issue 25, item 6: expert layers see the rows' tokens flattened, so neither per-row
    scaling nor PEFT's sub-batches switch the adapter per row there; the stats line says why."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from studio.chat.engine import _sequential_mode

    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16}
    config = getattr(transformers, family)(
        vocab_size=97,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        **sizes,
        **({"num_experts": 4} if "Qwen" in family else {"num_local_experts": 4}),
    )
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    problem = batching.mixed_batch_problem(model)
    assert problem is not None and "mixture-of-experts" in problem and "experts=4" in problem
    assert "mixture-of-experts" in _sequential_mode(2, problem)  # what the stats line shows
    assert batching.mixed_batch_problem(_tiny_peft()) is None  # a dense model still batches


def test_an_ab_pair_runs_one_after_the_other_only_where_a_batch_is_dear() -> None:
    """fp32 on a CPU: a 2-row step costs ~1.7 one-row steps, so an A/B pair goes A then B;
    in bf16, on another device (meta stands for a GPU here) or for many rows, one batch."""
    import torch

    model = _tiny_peft()
    assert "fp32 on this CPU" in (batching.batch_cost_problem(model, 2) or "")
    assert batching.batch_cost_problem(model, 16) is None  # batch compare still batches
    assert batching.batch_cost_problem(model.to(torch.bfloat16), 2) is None
    assert batching.batch_cost_problem(model.to("meta"), 2) is None
