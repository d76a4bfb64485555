"""A loss head under a causal LM's own forward, switched on by a keyword.

The studio scores some losses from the last hidden states itself: the compact head (a CPU, or
a GPU without Triton: `recipe.install_compact_head`) and DPO's compact log-probs on a CPU
(`dpo.install_compact_logps`). Each is a keyword of the model's own forward, as TRL's
`fused_lm_head` is, so whatever hooks that forward (the progress callback's token count,
tests' injected failures) still sees every training step, and every other call (generation,
evals) reaches the forward unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# head(causal_lm, hidden states, labels, num_items_in_batch or None) -> the model's output
Head = Callable[[Any, Any, Any, Any], Any]


def install_head(model: Any, keyword: str, head: Head) -> None:
    """Give the causal LM under `model` (PEFT or not) a forward that, called with
    `keyword=True`, runs the base model to its last hidden states and returns `head(...)`.
    Installed once per keyword; a second call leaves the first in place."""
    import functools

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    marker = f"_studio_head_{keyword}"
    if getattr(causal_lm, marker, False):
        return
    inner = causal_lm.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.pop(keyword, False):
            return inner(*args, **kwargs)
        labels = kwargs.pop("labels")
        count = kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = causal_lm.base_model(*args, **kwargs).last_hidden_state
        return head(causal_lm, hidden, labels, count)

    causal_lm.forward = forward
    setattr(causal_lm, marker, True)
