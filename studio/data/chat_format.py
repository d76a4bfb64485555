"""One way to turn chat messages into training tokens, shared by the Dataset preview,
training, chat and export, so what the user previews is exactly what the model learns.

The base model's own chat template renders the conversation once; each message's content is
then found in order in that text, and each assistant reply is marked for the loss through the
end-of-turn marker the template writes after it (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`,
...). The marker is read off the template by rendering probe conversations, never looked up in
the tokenizer's vocabulary: it is what generation must learn to emit so the model stops (the
pad == eos pitfall: that token must be trained). What a template does is measured once per
template string and cached, so tokenizing thousands of rows stays fast.

A reply with `"weight": 0` (OpenAI's fine-tuning format: context, not a target) is rendered
like any other and masked like the user turns, so the model reads it but does not learn it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]  # role, content, and "weight": 0 on a reply that is not trained

# Probe contents: plain words no template rewrites, unlikely to occur in template text.
_PROBE_SYSTEM = "Zqx probe system rule"
_PROBE_USER = "Zqx probe first question"
_PROBE_REPLY = "Zqx probe first answer"
_PROBE_USER2 = "Zqx probe second question"
# Where a cut between two different continuations can fall: after these, a new piece starts.
_PIECE_ENDS = ">]})"

FOLD_NOTE = (
    "This model's chat template has no system role: the system prompt is folded into the"
    " first user message"
)
DROP_NOTE = (
    "This model's chat template leaves the system prompt out of conversations that end with"
    " an assistant reply (it writes it only before the last user message), so training rows"
    " do not see it"
)


class TemplateError(ValueError):
    """The model's chat template rejects this conversation (role order, system role...)."""


@dataclass
class TokenizedConversation:
    """Token ids with a per-token flag: 1 when the token counts toward the loss."""

    input_ids: list[int]
    assistant_mask: list[int]
    text: str
    truncated: bool
    # 1 for the tokens of a weight-0 reply, kept out of the loss even when every token trains
    # (assistant_only_loss off); empty when the conversation has none.
    context_mask: list[int] = field(default_factory=list)

    @property
    def trained_tokens(self) -> int:
        return sum(self.assistant_mask)


@dataclass(frozen=True)
class TemplateTraits:
    """What one chat template does, measured by rendering probe conversations."""

    marker: str | None  # text the template writes right after a reply; None when it writes none
    folds_system: bool  # the template refuses a system role, so render folds it into user 1
    drops_system: bool  # the template silently leaves the system prompt out of training rows


_TRAITS: dict[tuple[str, str, str], TemplateTraits] = {}


def _apply(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    """The template's own output for these messages, its errors as TemplateError."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "this tokenizer has no chat template; pick an instruct/chat model or one with "
            "chat_template.jinja in its folder"
        )
    if any("weight" in m for m in messages):  # ours, not the template's
        messages = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja raises its own exception types, e.g. role alternation
        raise TemplateError(f"the model's chat template rejects this conversation: {exc}") from exc


def _cut_to_piece(text: str) -> str:
    """The longest prefix of `text` that ends where a new piece can start (after `>`,
    `]`, whitespace...), so a half-written token such as the `<|` of a next header is dropped."""
    cut = max((i + 1 for i, c in enumerate(text) if c.isspace() or c in _PIECE_ENDS), default=0)
    return text[:cut]


def common_prefix(texts: list[str]) -> str:
    """The longest prefix all texts share ("" for none)."""
    if not texts:
        return ""
    first, last = min(texts), max(texts)  # the lexical extremes differ first, if any differ
    n = next((i for i, (x, y) in enumerate(zip(first, last, strict=False)) if x != y), None)
    return first[: min(len(first), len(last)) if n is None else n]


def probe_conversation(roles: str) -> list[Message]:
    """Probe messages for a role sequence such as "user assistant user": each message's text
    is a fixed phrase, the second user turn its own, so a render shows where each one went.
    The chat template is probed only with these (here and by the export's Ollama template)."""
    texts = {"system": _PROBE_SYSTEM, "user": _PROBE_USER, "assistant": _PROBE_REPLY}
    msgs: list[Message] = []
    for role in roles.split():
        seen_user = any(m["role"] == "user" for m in msgs)
        text = _PROBE_USER2 if role == "user" and seen_user else texts[role]
        msgs.append({"role": role, "content": text})
    return msgs


def _derive_marker(tokenizer: Any) -> str | None:
    """The end-of-turn text: what the template writes after a reply both when the chat ends
    there and when another user turn follows (what differs belongs to the end or the next turn).
    """
    try:
        final = _apply(tokenizer, probe_conversation("user assistant"), False)
        longer = _apply(tokenizer, probe_conversation("user assistant user"), False)
    except TemplateError:
        return None
    if _PROBE_REPLY not in final or _PROBE_REPLY not in longer or _PROBE_USER2 not in longer:
        return None
    after_final = final[final.index(_PROBE_REPLY) + len(_PROBE_REPLY) :]
    start = longer.index(_PROBE_REPLY) + len(_PROBE_REPLY)
    after_mid = longer[start : longer.index(_PROBE_USER2, start)]
    common = common_prefix([after_final, after_mid])
    if common not in (after_final, after_mid):  # both go on, differently: cut at a piece end
        common = _cut_to_piece(common)  # Phi-3.5: "<|end|>\n" + EOS vs "<|end|>\n<|user|>"
    return common.strip() or None


def _system_support(tokenizer: Any) -> tuple[bool, bool]:
    """(folds, drops): whether the template refuses a system role, and whether it leaves the
    system text out of a conversation that ends with a reply (Mistral Nemo does)."""
    try:
        _apply(tokenizer, probe_conversation("user"), True)
    except TemplateError:
        return False, False
    try:
        _apply(tokenizer, probe_conversation("system user"), True)
    except TemplateError:
        return True, False
    try:
        written = _apply(tokenizer, probe_conversation("system user assistant"), False)
        return False, _PROBE_SYSTEM not in written
    except TemplateError:
        return False, False


def template_traits(tokenizer: Any) -> TemplateTraits:
    """The measured traits of the tokenizer's chat template, cached per template string
    (with BOS/EOS, which templates write by name)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    key = (template, str(tokenizer.bos_token), str(tokenizer.eos_token))
    traits = _TRAITS.get(key)
    if traits is None:
        marker = _derive_marker(tokenizer) if template else None
        folds, drops = _system_support(tokenizer) if template else (False, False)
        traits = _TRAITS[key] = TemplateTraits(marker, folds, drops)
    return traits


def template_notes(tokenizer: Any) -> list[str]:
    """Plain-words notes on how the template treats the conversation, for the Dataset tab."""
    traits = template_traits(tokenizer)
    return [
        note
        for flag, note in ((traits.folds_system, FOLD_NOTE), (traits.drops_system, DROP_NOTE))
        if flag
    ]


def _fold_system(messages: list[Message]) -> list[Message]:
    """A leading system message merged into the first user turn (system + blank line + user),
    for templates with no system role: the instructions still reach the model."""
    if len(messages) < 2 or messages[0].get("role") != "system":
        return messages
    if messages[1].get("role") != "user":
        return messages  # nothing to fold into: let the template say what it rejects
    system, user = messages[0].get("content") or "", messages[1].get("content") or ""
    first = {**messages[1], "content": f"{system}\n\n{user}" if system else user}
    return [first, *messages[2:]]


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as the model's template writes it.

    Where the template has no system role, the system prompt is folded into the first user
    turn here, so preview, training, chat and export all see the same text.
    """
    if template_traits(tokenizer).folds_system:
        messages = _fold_system(messages)
    return _apply(tokenizer, messages, add_generation_prompt)


def end_of_turn_marker(tokenizer: Any) -> str | None:
    """The text the template writes right after an assistant reply (None when it writes none)."""
    return template_traits(tokenizer).marker if getattr(tokenizer, "chat_template", None) else None


def end_of_turn_token(tokenizer: Any) -> str | None:
    """What closes an assistant turn, i.e. what generation must learn to emit: the template's
    marker, else the tokenizer's EOS (which training appends when the template writes none)."""
    return end_of_turn_marker(tokenizer) or tokenizer.eos_token


def _find(text: str, content: str, start: int) -> tuple[int, int] | None:
    """Where `content` is written in `text` from `start` on: verbatim, else trimmed (Gemma's
    template trims every message)."""
    for piece in (content, content.strip()):
        at = text.find(piece, start)
        if at >= 0:
            return at, at + len(piece)
    return None


def _close(text: str, end: int, closer: str | None) -> tuple[int, bool]:
    """The end of a reply's span: through the whitespace and marker that follow the content
    (the model must emit them), not the newline after the marker. False when none follows."""
    j = end
    while j < len(text) and text[j].isspace():
        j += 1
    if closer and text.startswith(closer, j):
        return j + len(closer), True
    if j == len(text):  # unterminated last reply: its trailing whitespace is trained, then EOS
        return j, False
    return end, False


def _system_comes_first(text: str, rest: list[Message], system_end: int) -> bool:
    """Whether the next turn is written after the system text: some templates (Mistral Nemo)
    put the system prompt inside the last user turn, so the search must not skip past it."""
    nxt = next((m for m in rest if m.get("role") != "system"), None)
    return nxt is None or _find(text, nxt.get("content") or "", system_end) is not None


Span = tuple[int, int]


def _locate(tokenizer: Any, messages: list[Message]) -> tuple[str, list[Span], list[Span], bool]:
    """Render once and find each message's content in order, each search starting after the
    previous one (so a reply quoted in a user turn is not taken for the reply).

    Returns the text, the spans of the trained assistant replies (through their marker), the
    spans of the weight-0 replies (context, never trained) and whether the conversation ends
    with a trained reply the template left without a marker.
    """
    traits = template_traits(tokenizer)
    msgs = _fold_system(messages) if traits.folds_system else messages
    text = _apply(tokenizer, msgs, False)
    closer = traits.marker or tokenizer.eos_token
    spans: list[Span] = []
    skipped: list[Span] = []
    cursor, closed = 0, True
    for i, msg in enumerate(msgs):
        role, found = msg.get("role"), _find(text, msg.get("content") or "", cursor)
        if role == "system":
            if found and _system_comes_first(text, msgs[i + 1 :], found[1]):
                cursor = found[1]
        elif role == "assistant":
            if found is None:
                raise TemplateError(
                    f"the chat template rewrites assistant message {i + 1}, so its tokens"
                    " cannot be located for the loss"
                )
            end, closed = _close(text, found[1], closer)
            (skipped if msg.get("weight") == 0 else spans).append((found[0], end))
            cursor = end
        elif found is not None:
            cursor = found[1]
    last = msgs[-1] if msgs else {}
    open_end = last.get("role") == "assistant" and last.get("weight") != 0 and not closed
    return text, spans, skipped, open_end


def assistant_spans(tokenizer: Any, messages: list[Message]) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return the character spans of each trained assistant turn.

    A span runs from the first character of the reply to the end of the end-of-turn marker
    the template writes after it; the newline a template puts after that marker is not trained.
    """
    text, spans, _, _ = _locate(tokenizer, messages)
    return text, spans


def _mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token that overlaps a span (both lists are in text order)."""
    mask = [0] * len(offsets)
    live = [(s, e) for s, e in spans if e > s]
    k = 0
    for tok_i, (a, b) in enumerate(offsets):
        while k < len(live) and live[k][1] <= a:
            k += 1
        if k == len(live):
            break
        if b > a and b > live[k][0]:
            mask[tok_i] = 1
    return mask


def tokenize_conversation(
    tokenizer: Any, messages: list[Message], max_length: int | None = None
) -> TokenizedConversation:
    """Token ids and the assistant mask of one conversation, truncated to max_length.

    When a template does not write an end-of-turn marker after the last reply, the
    tokenizer's EOS is appended and trained, so the tuned model learns to stop (unless that
    reply has weight 0: then nothing of it is trained).
    """
    text, spans, skipped, open_end = _locate(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    mask = _mask(enc["offset_mapping"], spans)
    context = _mask(enc["offset_mapping"], skipped) if skipped else []
    eos_id = tokenizer.eos_token_id
    if open_end and eos_id is not None:
        ids.append(eos_id)
        mask.append(1)
        context += [0] if context else []
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask, context = ids[:max_length], mask[:max_length], context[:max_length]
    return TokenizedConversation(ids, mask, text, truncated, context)


def template_hash(tokenizer: Any) -> str:
    """A hash of the chat template and special tokens, to warn when Chat/Export differ."""
    h = hashlib.sha256()
    h.update((getattr(tokenizer, "chat_template", "") or "").encode())
    for tok in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token):
        h.update(str(tok).encode())
    h.update(str(len(tokenizer)).encode())
    return h.hexdigest()[:16]
