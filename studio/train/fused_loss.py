"""TRL's fused-head training loss without its per-micro-batch host syncs.

TRL 1.16's `SFTTrainer.compute_loss` (trl/trainer/sft_trainer.py) follows each micro-batch's
loss with entropy and token-accuracy metrics and a token count, each read back to the host
with `.item()` (and `num_valid > 0`): four GPU->CPU syncs per micro-batch that stall the queue
of kernels. TRL has no setting to turn them off, and the studio shows neither metric (its
progress callback counts tokens itself), so training steps take the same loss here without
them: the fused head's log-probabilities of the label tokens, summed, over the batch's token
count. Anything else TRL's loss may do (label smoothing, a custom loss function, DFT, an MoE
aux loss, sequence parallelism) keeps TRL's own path.
"""

from __future__ import annotations

from typing import Any


def applies(trainer: Any) -> bool:
    """Whether TRL would take the plain fused-head NLL path for this trainer's loss."""
    args = trainer.args
    parallel = getattr(trainer.accelerator, "parallelism_config", None)
    return (
        trainer.model.training
        and getattr(trainer, "compute_loss_func", None) is None
        and getattr(trainer, "label_smoother", None) is None
        and getattr(args, "loss_type", "nll") == "nll"
        and not getattr(trainer, "aux_loss_enabled", False)
        and not getattr(parallel, "sp_enabled", False)
    )


def loss_without_syncs(
    trainer: Any, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
) -> Any:
    """The loss TRL's fused-head path computes, with nothing read back to the host."""
    import torch

    outputs = model(**{**inputs, "use_cache": False}, fused_lm_head=True)
    count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = (-outputs.log_probs).sum() / torch.as_tensor(count).clamp(min=1)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (trainer.accelerator.num_processes // trainer.get_tp_size())
    return loss
