"""One way to turn chat messages into training tokens, shared by the Dataset preview,
training, chat and export, so what the user previews is exactly what the model learns.

The base model's own chat template renders the conversation; each assistant turn, through its
end-of-turn token (the pad == eos pitfall: that token must be trained), is marked for the loss.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]


class TemplateError(ValueError):
    """The model's chat template rejects this conversation (role order, system role...)."""


@dataclass
class TokenizedConversation:
    """Token ids with a per-token flag: 1 when the token counts toward the loss."""

    input_ids: list[int]
    assistant_mask: list[int]
    text: str
    truncated: bool

    @property
    def trained_tokens(self) -> int:
        return sum(self.assistant_mask)


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as the model's template writes it."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "this tokenizer has no chat template; pick an instruct/chat model or one with "
            "chat_template.jinja in its folder"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja raises its own exception types, e.g. role alternation
        raise TemplateError(f"the model's chat template rejects this conversation: {exc}") from exc


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The token that closes an assistant turn (what generation must learn to emit)."""
    return tokenizer.eos_token


def assistant_spans(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return the character spans of each assistant turn.

    A span runs from the first character after the assistant header to the end of the
    end-of-turn token; the newline a template puts after that token is not trained.
    """
    text = render(tokenizer, messages)
    eot = end_of_turn_token(tokenizer) or ""
    spans: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not text.startswith(prefix) or not text.startswith(upto):
            raise TemplateError(
                "the chat template renders earlier turns differently once later turns are added,"
                " so assistant tokens cannot be located for the loss"
            )
        start, end = len(prefix), len(upto)
        content_at = text.find(msg.get("content", ""), start, end) if msg.get("content") else start
        if content_at >= 0:
            start = max(start, content_at)
        if eot:
            eot_at = text.rfind(eot, start, end)
            if eot_at >= 0:
                end = eot_at + len(eot)
        spans.append((start, end))
    return text, spans


def tokenize_conversation(
    tokenizer: Any, messages: list[Message], max_length: int | None = None
) -> TokenizedConversation:
    """Token ids and the assistant mask of one conversation, truncated to max_length.

    When a template does not write an end-of-turn token after the assistant reply, the
    tokenizer's EOS is appended and trained, so the tuned model learns to stop.
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    mask = [0] * len(ids)
    offsets = enc["offset_mapping"]
    for tok_i, (a, b) in enumerate(offsets):
        if b <= a:
            continue
        for s, e in spans:
            if a < e and b > s:
                mask[tok_i] = 1
                break
    eos_id = tokenizer.eos_token_id
    if spans and eos_id is not None and (not ids or ids[-1] != eos_id) and mask and mask[-1]:
        ids.append(eos_id)
        mask.append(1)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return TokenizedConversation(ids, mask, text, truncated)


def template_hash(tokenizer: Any) -> str:
    """A hash of the chat template and special tokens, to warn when Chat/Export differ."""
    h = hashlib.sha256()
    h.update((getattr(tokenizer, "chat_template", "") or "").encode())
    for tok in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token):
        h.update(str(tok).encode())
    h.update(str(len(tokenizer)).encode())
    return h.hexdigest()[:16]
