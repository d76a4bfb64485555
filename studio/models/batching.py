"""Prompts batched for greedy generation: one home for the left padding and the stop ids that
Chat's A/B pass (studio/chat/engine.py) and the training checks' sample answers
(studio/train/checks.py) both need, so the two cannot drift apart."""

from __future__ import annotations

from typing import Any


def pad_id(tok: Any) -> int:
    """The id that fills a left-padded row: the tokenizer's pad, else its EOS (masked out)."""
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


def left_pad(tok: Any, texts: list[str], device: Any) -> dict[str, Any]:
    """Prompts as one left-padded batch with its attention mask (and each real length).

    Padded by hand rather than through `tok(..., padding=True)`: that would flip the shared
    tokenizer's `padding_side` while another tab may be encoding. Left padding keeps every
    row's last real token at the end, where generation continues; `generate` derives each
    row's positions from the mask, so a padded row sees the positions it sees alone.
    """
    import torch

    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = pad_id(tok)
    width = max(len(r) for r in ids)
    input_ids = [[pad] * (width - len(r)) + list(r) for r in ids]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in ids]
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long, device=device),
        "attention_mask": torch.tensor(mask, dtype=torch.long, device=device),
        "lengths": [len(r) for r in ids],
    }


def eos_ids(model: Any) -> set[int]:
    """The token ids that end a row in `generate` (the model's generation EOS, a list or one)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return {int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None}
