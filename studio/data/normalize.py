"""Record normalisation: one parsed row in Alpaca, ShareGPT or chat-messages form -> messages.

Every usable row becomes `[{"role", "content"}, ...]`, the one form training, the token
statistics and the PII scan read. A row that cannot be used comes back as `(field, reason)`
problems instead, so the loader can report it with its line number and leave it out.

Alpaca: `instruction`, `input`, `output`, optional `system`. ShareGPT: `conversations:
[{from, value}]`. Chat messages: `messages: [{role, content}]`, including OpenAI's chat
fine-tuning rows: `weight: 0` on an assistant message keeps it as context only (the message
then carries `"weight": 0`, and its tokens get no loss), `name` is dropped. Rows that call
tools are recognised (`tool_use`) so the loader can count them instead of failing each one.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]  # role and content (text); "weight": 0 on a reply not trained
Row = dict[str, list[Message]]
Problems = list[tuple[str, str]]  # (field, reason) pairs that make a row unusable

FORMATS = ("messages", "sharegpt", "alpaca", "preference")  # preference: studio.data.preference
FORMAT_CHOICES = ("auto", *FORMATS)
ALPACA_FIELDS = ("instruction", "input", "output", "system")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# Spellings seen in ShareGPT-style files in the wild; they mean the same roles.
_SHAREGPT_ALIASES = {"user": "user", "assistant": "assistant"}
# Row keys that carry bookkeeping, not training text: tolerated and ignored.
META_KEYS = frozenset({"id", "source", "meta", "metadata", "lang", "language", "tags", "split"})
# Turn keys of OpenAI's chat fine-tuning format. `weight` 0/1 says whether an assistant
# message is trained; `name` (who speaks) is written by no chat template, so it is dropped.
WEIGHT_KEY = "weight"
DROPPED_TURN_KEYS = frozenset({"name"})
# What marks a tool-calling row (OpenAI function calling, LLaMA-Factory's ShareGPT tools):
# not supported yet, so such rows are counted and left out rather than each one an error.
_TOOL_ROW_KEYS = ("tools", "functions", "parallel_tool_calls")
_TOOL_TURN_KEYS = ("tool_calls", "function_call", "tool_call_id")
_TOOL_ROLES = frozenset({"tool", "function", "function_call", "observation", "ipython"})


def guess_record_format(rec: Any) -> str | None:
    """The format one parsed row looks like, by its keys; None when it looks like none."""
    if not isinstance(rec, dict):
        return None
    if "chosen" in rec and "rejected" in rec:
        return "preference"
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    return None


def _turns(rec: Any, fmt: str) -> list[Any]:
    """The row's list of turns in a chat format, or [] (Alpaca, or no list there)."""
    if fmt in ("alpaca", "preference") or not isinstance(rec, dict):
        return []
    turns = rec.get("messages" if fmt == "messages" else "conversations")
    return turns if isinstance(turns, list) else []


def tool_use(rec: Any, fmt: str) -> str | None:
    """What makes this row a tool-calling conversation (e.g. "tool_calls"), or None."""
    if fmt != "alpaca" and isinstance(rec, dict):
        for key in _TOOL_ROW_KEYS:
            if rec.get(key):
                return key
    role_key = "role" if fmt == "messages" else "from"
    for turn in _turns(rec, fmt):
        if not isinstance(turn, dict):
            continue
        for key in _TOOL_TURN_KEYS:
            if turn.get(key):
                return key
        role = turn.get(role_key)
        if isinstance(role, str) and role in _TOOL_ROLES:
            return f"role '{role}'"
    return None


def dropped_keys(rec: Any, fmt: str) -> set[str]:
    """Turn keys with a value in this row that are read and dropped (`name`), for one note per
    file. A table (Parquet, a hub dataset) gives every turn every key, null where unset."""
    turns = [t for t in _turns(rec, fmt) if isinstance(t, dict)]
    return {k for t in turns for k in DROPPED_TURN_KEYS if t.get(k) is not None}


def normalize_record(
    rec: Any, fmt: str, *, answer_required: bool = True
) -> tuple[list[Message] | None, Problems]:
    """One record as chat messages, or the (field, reason) problems that make it unusable.

    `answer_required=False` reads a prompt (Chat's batch compare): no assistant turn needed.
    """
    if not isinstance(rec, dict):
        return None, [("", f"expected a JSON object, got {json_type(rec)}")]
    if fmt == "alpaca":
        return _normalize_alpaca(rec, answer_required)
    key = "messages" if fmt == "messages" else "conversations"
    allowed = {key} | META_KEYS | {k for k in _TOOL_ROW_KEYS if not rec.get(k)}  # "tools": []
    problems: Problems = [
        (k, f"unknown key '{k}' (a {fmt} row holds '{key}')") for k in rec if k not in allowed
    ]
    turns = rec.get(key)
    if key not in rec:
        return None, [*problems, (key, f"missing key '{key}'{_format_hint(rec)}")]
    if not isinstance(turns, list) or not turns:
        return None, [*problems, (key, f"must be a non-empty list, got {json_type(turns)}")]
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        message = normalize_turn(turn, f"{key}[{i}]", fmt, problems)
        if message is not None:
            messages.append(message)
    if problems:
        return None, problems
    return _check_turns(messages, key, answer_required)


def normalize_turn(turn: Any, where: str, fmt: str, problems: Problems) -> Message | None:
    """One chat or ShareGPT turn as a message; its problems are appended to `problems`."""
    role_key, text_key = ("role", "content") if fmt == "messages" else ("from", "value")
    if not isinstance(turn, dict):
        problems.append((where, f"expected an object, got {json_type(turn)}"))
        return None
    known_keys = {role_key, text_key, WEIGHT_KEY, *DROPPED_TURN_KEYS, *_TOOL_TURN_KEYS}
    extra = [k for k in turn if k not in known_keys]
    problems += [(where, f"unknown key '{k}' (expected {role_key}, {text_key})") for k in extra]
    # Exports write "tool_calls": null on plain replies; a real tool call is not supported yet.
    problems += [
        (where, f"{k}: tool calls are not supported yet") for k in _TOOL_TURN_KEYS if turn.get(k)
    ]
    weight = turn.get(WEIGHT_KEY)
    if weight is not None and (isinstance(weight, bool) or weight not in (0, 1)):
        shown = repr(weight) if isinstance(weight, int | float) else json_type(weight)
        problems.append((f"{where}.{WEIGHT_KEY}", f"weight must be 0 or 1, got {shown}"))
        return None
    if role_key not in turn:
        problems.append((where, f"missing key '{role_key}'"))
        return None
    raw_role = turn[role_key]
    if fmt == "messages":
        role = raw_role if raw_role in ROLES else None
        expected = "system, user or assistant"
    else:
        # A role that is not text (a list, an object) cannot be a dict key: no role at all.
        known = isinstance(raw_role, str)
        role = SHAREGPT_ROLES.get(raw_role) or _SHAREGPT_ALIASES.get(raw_role) if known else None
        expected = "human, gpt or system"
    if role is None:
        problems.append((f"{where}.{role_key}", f"unknown role {raw_role!r} (expected {expected})"))
        return None
    if text_key not in turn:
        problems.append((where, f"missing key '{text_key}'"))
        return None
    content = turn[text_key]
    if content is not None and not isinstance(content, str):
        problems.append((f"{where}.{text_key}", f"content must be text, got {json_type(content)}"))
        return None
    if content is None or not content.strip():
        problems.append((f"{where}.{text_key}", f"empty content in the {role} turn"))
        return None
    if role == "assistant" and weight == 0:  # context only: kept, not trained
        return {"role": role, "content": content, WEIGHT_KEY: 0}
    return {"role": role, "content": content}


def _normalize_alpaca(
    rec: dict[str, Any], answer_required: bool = True
) -> tuple[list[Message] | None, Problems]:
    problems: Problems = []
    required = ("instruction", "output") if answer_required else ("instruction",)
    allowed = set(ALPACA_FIELDS) | META_KEYS
    problems += [
        (k, f"unknown key '{k}' (an Alpaca row holds instruction, input, output, system)")
        for k in rec
        if k not in allowed
    ]
    values: dict[str, str] = {}
    for fld in ALPACA_FIELDS:
        value = rec.get(fld)
        if fld in required and fld not in rec:
            problems.append((fld, f"missing key '{fld}'{_format_hint(rec)}"))
            continue
        if value is None:
            value = ""
        if not isinstance(value, str):
            problems.append((fld, f"must be text, got {json_type(value)}"))
            continue
        if fld in required and not value.strip():
            problems.append((fld, f"empty content in '{fld}'"))
            continue
        values[fld] = value
    if problems:
        return None, problems
    messages: list[Message] = []
    if values.get("system", "").strip():
        messages.append({"role": "system", "content": values["system"]})
    user = values["instruction"]
    if values.get("input", "").strip():
        user = f"{user}\n\n{values['input']}"
    messages.append({"role": "user", "content": user})
    if values.get("output", "").strip():
        messages.append({"role": "assistant", "content": values["output"]})
    return messages, []


def _check_turns(
    messages: list[Message], key: str, answer_required: bool = True
) -> tuple[list[Message] | None, Problems]:
    roles = {m["role"] for m in messages}
    problems = []
    if "user" not in roles:
        problems.append((key, "no user turn"))
    if answer_required and "assistant" not in roles:
        problems.append((key, "no assistant turn (nothing to train on)"))
    elif answer_required and all(
        m.get(WEIGHT_KEY) == 0 for m in messages if m["role"] == "assistant"
    ):
        problems.append((key, "every assistant turn has weight 0 (nothing to train on)"))
    return (None, problems) if problems else (messages, [])


def _format_hint(rec: dict[str, Any]) -> str:
    other = guess_record_format(rec)
    if other:
        return f" (this row looks like the {other} format)"
    keys = ", ".join(list(rec)[:6]) or "none"
    return f" (row keys: {keys})"


def json_type(value: Any) -> str:
    """How a user would name the JSON type of value ("an object", "a number", "null")."""
    return {
        dict: "an object",
        list: "a list",
        str: "text",
        bool: "true/false",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
