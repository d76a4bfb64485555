"""Preference rows (DPO): one prompt, a `chosen` answer and a `rejected` one.

TRL's preference formats, as people bring them:

- `{"prompt": "...", "chosen": "...", "rejected": "..."}`: plain strings (the prompt becomes
  a user turn, each answer an assistant turn);
- conversational: `prompt` a message list (system/user/assistant turns ending on a user
  turn), `chosen` / `rejected` lists of assistant messages;
- implicit prompt: no `prompt`, and `chosen` / `rejected` whole conversations that share
  everything up to the answers (the shared turns are the prompt).

A usable row becomes `{"prompt", "chosen", "rejected", "messages"}` where `messages` is
prompt + chosen: every reader of SFT rows (token lengths, the row search, the JSON check, the
chat template check) reads the preferred conversation, and the PII scan reads `rejected`
too. A row that cannot be used comes back as `(field, reason)` problems, like
`normalize.normalize_record`, so the loader reports it with its line number.
"""

from __future__ import annotations

from typing import Any

from studio.data.normalize import (
    META_KEYS,
    Message,
    Problems,
    json_type,
    normalize_turn,
)

PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


def looks_like_preference(rec: Any) -> bool:
    """A row with both answers: the one mark of a preference row."""
    return isinstance(rec, dict) and "chosen" in rec and "rejected" in rec


def normalize_preference(rec: Any) -> tuple[dict[str, list[Message]] | None, Problems]:
    """One preference record as prompt/chosen/rejected messages, or why it is unusable."""
    if not isinstance(rec, dict):
        return None, [("", f"expected a JSON object, got {json_type(rec)}")]
    problems: Problems = [
        (k, f"unknown key '{k}' (a preference row holds prompt, chosen, rejected)")
        for k in rec
        if k not in PREFERENCE_KEYS and k not in META_KEYS
    ]
    for key in ("chosen", "rejected"):
        if key not in rec:
            problems.append((key, f"missing key '{key}'"))
    if problems:
        return None, problems
    chosen = _turns(rec["chosen"], "chosen", problems)
    rejected = _turns(rec["rejected"], "rejected", problems)
    if problems or chosen is None or rejected is None:
        return None, problems
    if "prompt" in rec:
        prompt = _turns(rec["prompt"], "prompt", problems, role="user")
    else:  # implicit prompt: the turns both conversations share
        prompt, chosen, rejected = _split_shared(chosen, rejected, problems)
    if problems or prompt is None:
        return None, problems
    problems += _pair_problems(prompt, chosen, rejected)
    if problems:
        return None, problems
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "messages": prompt + chosen,
    }, []


def _turns(
    value: Any, key: str, problems: Problems, role: str = "assistant"
) -> list[Message] | None:
    """A string (one `role` turn) or a message list, as messages; problems appended."""
    if isinstance(value, str):
        if not value.strip():
            problems.append((key, f"empty {key}"))
            return None
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        problems.append((key, f"must be text or a non-empty message list, got {json_type(value)}"))
        return None
    before = len(problems)
    turns = [normalize_turn(t, f"{key}[{i}]", "messages", problems) for i, t in enumerate(value)]
    if len(problems) > before:
        return None
    return [t for t in turns if t is not None]


def _split_shared(
    chosen: list[Message], rejected: list[Message], problems: Problems
) -> tuple[list[Message] | None, list[Message], list[Message]]:
    """(prompt, chosen answer, rejected answer) of two whole conversations."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        problems.append(("prompt", "missing: give a 'prompt', or conversations sharing one"))
        return None, chosen, rejected
    return chosen[:n], chosen[n:], rejected[n:]


def _pair_problems(
    prompt: list[Message], chosen: list[Message], rejected: list[Message]
) -> Problems:
    """What makes a well-formed pair useless to learn from."""
    problems: Problems = []
    if prompt[-1]["role"] != "user":
        problems.append(("prompt", f"must end with a user turn, not {prompt[-1]['role']}"))
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        roles = {m["role"] for m in answer}
        if roles != {"assistant"}:
            shown = ", ".join(sorted(roles - {"assistant"}))
            problems.append((key, f"must hold assistant turns only (found {shown})"))
    if _texts(chosen) == _texts(rejected):
        problems.append(("rejected", "same as chosen: nothing to prefer"))
    return problems


def _texts(turns: list[Message]) -> list[str]:
    return [m["content"].strip() for m in turns]


def answer_text(turns: list[Message]) -> str:
    """The answer's text as a reader sees it (turns joined)."""
    return "\n".join(m["content"] for m in turns)


def pair_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Plain figures of preference rows for the Dataset tab: answer lengths in characters,
    and how many pairs have a chosen answer longer than the rejected one (a preference that
    is only "longer is better" is one DPO learns too well)."""
    if not rows:
        return {"pairs": 0}
    chosen = [len(answer_text(r["chosen"])) for r in rows]
    rejected = [len(answer_text(r["rejected"])) for r in rows]
    return {
        "pairs": len(rows),
        "chosen_chars_mean": round(sum(chosen) / len(rows), 1),
        "rejected_chars_mean": round(sum(rejected) / len(rows), 1),
        "chosen_longer": sum(c > r for c, r in zip(chosen, rejected, strict=True)),
    }
