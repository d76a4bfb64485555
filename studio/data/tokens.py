"""Token statistics of a dataset, measured with the base model's own chat template and tokenizer.

Lengths count what training sees (`chat_format.tokenize_conversation`, untruncated), so the
Dataset tab's "rows over max length" is the number training will cut. Counting is fast on big
datasets: the pieces between special tokens are tokenized once each (template boilerplate and
repeated system prompts cost nothing), checked against whole-text counts on a sample.

Also here: the preview of one row as training text, marking which characters carry the loss.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from studio.data import chat_format
from studio.data.normalize import Message, Row

DEFAULT_MAX_LEN = 512


def _backend(tokenizer: Any) -> Any | None:
    """The Rust `tokenizers.Tokenizer` behind a fast tokenizer, if there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    return backend if hasattr(backend, "encode_batch_fast") else None


def _lengths_direct(tokenizer: Any, texts: list[str]) -> list[int]:
    backend = _backend(tokenizer)
    out: list[int] = []
    for i in range(0, len(texts), 4096):
        chunk = texts[i : i + 4096]
        if backend is not None:
            out.extend(len(e) for e in backend.encode_batch_fast(chunk, add_special_tokens=False))
        else:
            out.extend(len(ids) for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return out


def _lengths_by_segment(tokenizer: Any, texts: list[str]) -> list[int] | None:
    """Token counts that tokenize each distinct piece between special tokens only once.

    A fast tokenizer cuts its input at its added tokens before anything else, so the
    pieces between them are tokenized independently; template boilerplate and repeated system
    prompts then cost nothing. Checked against whole-text counts on a sample: if the tokenizer
    does not behave this way (None), the caller counts whole texts.
    """
    backend = _backend(tokenizer)
    if backend is None:
        return None
    specials = sorted(
        {t.content for t in backend.get_added_tokens_decoder().values() if t.content},
        key=len,
        reverse=True,
    )
    if not specials:
        return None
    splitter = re.compile("|".join(re.escape(s) for s in specials))
    piece_ids: dict[str, int] = {}
    per_text: list[tuple[int, list[int]]] = []
    for text in texts:
        n_special = 0
        ids: list[int] = []
        last = 0
        for m in splitter.finditer(text):
            if m.start() > last:
                ids.append(piece_ids.setdefault(text[last : m.start()], len(piece_ids)))
            n_special += 1
            last = m.end()
        if last < len(text):
            ids.append(piece_ids.setdefault(text[last:], len(piece_ids)))
        per_text.append((n_special, ids))
    pieces = list(piece_ids)
    del piece_ids
    counts = _lengths_direct(tokenizer, pieces)
    lengths = [n + sum(counts[i] for i in ids) for n, ids in per_text]
    sample = list(range(0, len(texts), max(1, len(texts) // 64)))[:64]
    exact = _lengths_direct(tokenizer, [texts[i] for i in sample])
    if any(lengths[i] != e for i, e in zip(sample, exact, strict=True)):
        return None
    return lengths


def token_lengths(rows: list[Row], tokenizer: Any) -> list[int]:
    """Tokens per row as training sees them (chat_format.tokenize_conversation, untruncated)."""
    texts: list[str] = []
    extra: list[int] = []
    eos = tokenizer.eos_token
    for row in rows:
        msgs = row["messages"]
        text = chat_format.render(tokenizer, msgs)
        texts.append(text)
        # tokenize_conversation appends EOS when the template leaves a trained reply open:
        # nothing but whitespace after it.
        last = msgs[-1]
        trained_last = last["role"] == "assistant" and last.get("weight") != 0
        open_end = text.rstrip().endswith(last["content"].rstrip())
        extra.append(int(bool(eos) and trained_last and open_end))
    lengths = _lengths_by_segment(tokenizer, texts)
    if lengths is None:
        lengths = _lengths_direct(tokenizer, texts)
    return [n + e for n, e in zip(lengths, extra, strict=True)]


def token_stats(rows: list[Row], tokenizer: Any, max_len: int = DEFAULT_MAX_LEN) -> dict[str, Any]:
    """Token-length figures of the rows with the model's own template and tokenizer."""
    return length_stats(token_lengths(rows, tokenizer), max_len)


def length_stats(lengths: list[int], max_len: int = DEFAULT_MAX_LEN) -> dict[str, Any]:
    """p50/p95/max and the rows over max_len, from measured lengths (a new max_len is free)."""
    ordered = sorted(lengths)
    over = [i for i, n in enumerate(lengths) if n > max_len]
    return {
        "rows": len(lengths),
        "p50": _percentile(ordered, 50),
        "p95": _percentile(ordered, 95),
        "max": ordered[-1] if ordered else 0,
        "mean": round(statistics.fmean(lengths), 1) if lengths else 0.0,
        "max_len": max_len,
        "over_max_len": len(over),
        "over_rows": over,  # indices into rows
        "lengths": lengths,
        "total_tokens": sum(lengths),
    }


def _percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile: a length that some row really has."""
    if not ordered:
        return 0
    k = max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))
    return ordered[int(k)]


def preview_row(
    row: Row | list[Message], tokenizer: Any, max_len: int | None = DEFAULT_MAX_LEN
) -> list[tuple[str, bool]]:
    """The exact training text of one row as (text, trained) segments.

    Built from chat_format.tokenize_conversation: a character is "trained" when a token that
    counts toward the loss covers it, so each assistant reply and its end-of-turn token show
    as trained. Text past max_len tokens (cut by truncation) is left out.
    """
    messages = row["messages"] if isinstance(row, dict) else row
    tc = chat_format.tokenize_conversation(tokenizer, messages, max_len)
    text = tc.text
    # The same call tokenize_conversation makes, so token i here is token i there.
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"
    ]
    kept = min(len(tc.input_ids), len(offsets))
    flags = [False] * len(text)
    for i in range(kept):
        if tc.assistant_mask[i]:
            a, b = offsets[i]
            flags[a:b] = [True] * (b - a)
    end_char = len(text) if kept == len(offsets) else max(b for _, b in offsets[:kept])
    segments: list[tuple[str, bool]] = []
    start = 0
    for c in range(1, end_char + 1):
        if c == end_char or flags[c] != flags[start]:
            segments.append((text[start:c], flags[start]))
            start = c
    for i in range(len(offsets), len(tc.input_ids)):  # appended after the text (EOS)
        token = tokenizer.convert_ids_to_tokens(tc.input_ids[i])
        segments.append((token, bool(tc.assistant_mask[i])))
    return segments
