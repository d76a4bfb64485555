"""DPO's own computations: the compact answer-token head and the held-out pair figures.

The DPO recipe itself (DPOConfig, the DPOTrainer with no `ref_model`) is in `recipe.py`,
beside SFT's, so one file says how a run trains. Here:

- `install_compact_logps`: on CPU, the log-probs TRL asks for (`fused_lm_head=True`) of the
  answer tokens only, with plain torch ops: TRL's head scores every position there, and an
  eval of 16 pairs took 62 s instead of a few.
- `preference_figures`: held-out pairs scored by the reference (the start) and the trained
  policy: how often each prefers the chosen answer, the DPO reward accuracy and margin, and
  the eval loss, for the checks (`checks.preference_checks`).
"""

from __future__ import annotations

import math
from typing import Any

from studio.train import heads

# --- the compact head: log-probs of the answer tokens only ----------------------------------


def compact_logps(hidden: Any, head: Any, labels: Any) -> dict[str, Any]:
    """TRL's per-token fields (log_probs, entropy, mean_logits, is_top1) at the label
    positions only, as [batch, seq-1] tensors zero elsewhere.

    The answer is a third of a pair's tokens, so scoring only it (with plain torch ops, the
    logits of those positions alone) is what makes a DPO step on the CPU affordable."""
    import torch
    import torch.nn.functional as F

    labels = labels[:, 1:]
    mask = labels != -100
    logits = F.linear(hidden[:, :-1][mask], head.weight, head.bias).float()
    logp_all = logits.log_softmax(-1)
    targets = labels[mask]
    picked = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        mean_logits = logits.mean(-1)
        is_top1 = logits.argmax(-1) == targets

    def spread(values: Any) -> Any:
        return values.new_zeros(mask.shape).masked_scatter(mask, values)

    return {
        "log_probs": spread(picked),
        "entropy": spread(entropy),
        "mean_logits": spread(mean_logits),
        "is_top1": spread(is_top1),
        "count": mask.sum(),
    }


def install_compact_logps(model: Any) -> None:
    """Answer `fused_lm_head=True` calls of the causal LM under `model` with `compact_logps`.

    Wraps the forward TRL installed (`add_fused_lm_head`) through `heads.install_head`, so
    every other call (generation, the studio's own evals) still goes to the model's own."""
    heads.install_head(model, "fused_lm_head", _compact_output)


def _compact_output(causal_lm: Any, hidden: Any, labels: Any, _count: Any) -> Any:
    from trl.trainer.utils import FusedCausalLMOutput

    fields = compact_logps(hidden, causal_lm.get_output_embeddings(), labels)
    count = fields.pop("count").clamp(min=1)
    loss = -fields["log_probs"].sum() / count
    return FusedCausalLMOutput(loss=loss, **fields)


# --- held-out pairs: before and after ---------------------------------------------------------


def _sequence_logps(model: Any, batch: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Summed log-probs of the chosen and of the rejected answers of a collated batch."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        fused_lm_head=True,
    )
    logps = out.log_probs.sum(dim=1).float().cpu()
    chosen, rejected = logps.chunk(2, dim=0)
    return chosen.tolist(), rejected.tolist()


def preference_figures(trainer: Any) -> dict[str, Any]:
    """Held-out pairs scored by the reference (the start: adapter off, or the SFT adapter)
    and by the trained policy: the share where each gives the chosen answer more probability
    than the rejected one, the DPO reward accuracy (the policy raised chosen over rejected
    relative to the reference) and the mean reward margin (beta x that difference).

    Empty when the run held out no pairs."""
    import torch
    from trl.trainer.utils import use_adapter

    if trainer.eval_dataset is None:
        return {}
    model = trainer.model
    unwrapped = trainer.accelerator.unwrap_model(model)
    ref_name = "ref" if "ref" in unwrapped.peft_config else None
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {"pc": [], "pr": [], "rc": [], "rr": []}
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            c, r = _sequence_logps(model, batch)
            sums["pc"] += c
            sums["pr"] += r
            with use_adapter(unwrapped, adapter_name=ref_name):
                c, r = _sequence_logps(model, batch)
            sums["rc"] += c
            sums["rr"] += r
    model.train(was_training)
    return _summarize(sums, trainer.args.beta)


def _summarize(sums: dict[str, list[float]], beta: float) -> dict[str, Any]:
    """The figures of `preference_figures` from the four lists of summed log-probs."""
    n = len(sums["pc"])
    if not n:
        return {}
    pairs = list(zip(sums["pc"], sums["pr"], sums["rc"], sums["rr"], strict=True))
    deltas = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in pairs]
    return {
        "pairs": n,
        "before_prefers_chosen": round(sum(rc > rr for _, _, rc, rr in pairs) / n, 3),
        "after_prefers_chosen": round(sum(pc > pr for pc, pr, _, _ in pairs) / n, 3),
        "before_logp_margin": round(sum(rc - rr for _, _, rc, rr in pairs) / n, 3),
        "after_logp_margin": round(sum(pc - pr for pc, pr, _, _ in pairs) / n, 3),
        "reward_accuracy_before": 0.0,  # the policy starts as the reference: no reward yet
        "reward_accuracy": round(sum(d > 0 for d in deltas) / n, 3),
        "reward_margin_before": 0.0,
        "reward_margin": round(beta * sum(deltas) / n, 4),
        # DPO's sigmoid loss on these pairs: -log sigmoid(beta x delta), ln 2 at the start
        "eval_loss": round(sum(_softplus(-beta * d) for d in deltas) / n, 4),
    }


def _softplus(x: float) -> float:
    """log(1 + e^x), without overflow for large x."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))
