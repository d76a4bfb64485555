"""Generation's one home: when an answer ends, and greedy answers in one batched pass.

Every place that generates reads its stop ids from `stop_ids`: the training checks' sample
answers (`studio.train.checks`), the export's merge and GGUF checks (`studio.export`), the
loader's smoke answer and Chat's streamers (`studio.chat.engine`). An answer ends at the
first of: the chat template's end-of-turn marker (what training taught the model to emit),
the tokenizer's EOS, the model's generation-config EOS. Where these disagree (a template whose
marker is not the EOS), every caller now stops at the same token.
"""

from __future__ import annotations

from typing import Any

from studio.models.batching import eos_ids, left_pad_ids, pad_id


def stop_ids(tok: Any, model: Any) -> list[int]:
    """Token ids that end an answer: the template's end-of-turn marker (when it is one token),
    the tokenizer's EOS and the model's own generation EOS."""
    from studio.data.chat_format import end_of_turn_token

    ids: set[int] = set()
    marker = end_of_turn_token(tok)
    if marker:
        piece = tok(marker.strip() or marker, add_special_tokens=False)["input_ids"]
        if len(piece) == 1:
            ids.add(int(piece[0]))
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return sorted(ids | eos_ids(model))


def greedy_ids(
    model: Any,
    tok: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    stops: list[int] | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts in one left-padded batch, each cut right
    after its first stop id (kept, so callers can tell it ended and score that token).

    A batch of one is not padded at all; the export passes one prompt at a time where it
    compares two models token for token.
    """
    import torch

    stops = stop_ids(tok, model) if stops is None else stops
    enc = left_pad_ids([list(p) for p in prompts], pad_id(tok), model.device)
    width = enc["input_ids"].shape[1]
    with torch.inference_mode():
        out = model.generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=stops,
            pad_token_id=pad_id(tok),
            use_cache=True,
        )
    return [cut_at_stop(row, stops) for row in out[:, width:].tolist()]


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    """The ids through the first stop id (the padding `generate` adds after it dropped)."""
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    return ids if end is None else ids[: end + 1]


def answer_text(tok: Any, ids: list[int], stops: list[int]) -> tuple[str, bool]:
    """(the answer's text without its stop token, whether a stop token ended it)."""
    stopped = bool(ids) and ids[-1] in stops
    text = tok.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
    return text.strip(), stopped


def greedy_texts(
    model: Any, tok: Any, prompts: list[str], max_new_tokens: int
) -> list[tuple[str, bool]]:
    """Greedy answers to rendered prompts, batched: (text up to the stop, stopped?)."""
    stops = stop_ids(tok, model)
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in prompts]
    answers = greedy_ids(model, tok, enc, max_new_tokens, stops)
    return [answer_text(tok, ids, stops) for ids in answers]


def greedy_each(
    model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """`greedy_ids` for each prompt alone (a batch of one: no padding, so nothing shifts);
    the export compares two models token for token this way."""
    stops = stop_ids(tok, model)
    return [greedy_ids(model, tok, [p], max_new_tokens, stops)[0] for p in prompts]
