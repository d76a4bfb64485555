"""How `support_preferences.jsonl` was made from `support_tickets.jsonl` (rerun to rebuild it).

`python -m studio.data.sample_data.build_preferences` writes the bundled preference sample:
the first 60 short English single-question tickets without contact details (the PII gate
stays green), with a short system prompt asking for JSON. `chosen` is the ticket's JSON reply
with its answer cut to its first clause (short rows keep a CPU step short); `rejected` is the
same content in a form the prompt did not ask for, in turn: chatty prose, the JSON wrapped in
chat, or labelled plain text. So the checkable property of a good answer is "parses as a JSON
object".

English only: the embedded 135M model's Vietnamese answers fall into repeating a phrase
after a few DPO steps (one of four held-out answers never ended), which says more about the
model's Vietnamese than about the preference; the SFT sample keeps both languages.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "support_tickets.jsonl"
TARGET = HERE / "support_preferences.jsonl"
SYSTEM = "Reply with a JSON object with keys category, priority and answer."
MAX_WORDS = 14
ROWS = 60  # small: 6 held-out pairs score quickly on a CPU; a run takes only a few steps
MAX_USER_CHARS = 110  # short questions: a DPO step on a CPU costs by the token


def short_answer(text: str) -> str:
    """The answer's first clause, at most MAX_WORDS words, ending in a full stop."""
    clause = re.split(r"[;.!?]\s|[;:]", text, maxsplit=1)[0].strip().rstrip(",.")
    words = clause.split()
    return " ".join(words[:MAX_WORDS]).rstrip(",") + "."


def rejected_for(i: int, reply: dict[str, str]) -> str:
    """A worse reply with the same content: prose, JSON wrapped in chat, or labelled text.

    Tried and dropped (8 steps on a CPU): JSON cut off mid-string (one of four answers then
    ran on: rejecting an early end may teach not to end) and JSON without quotes (too close
    to the chosen form: the answers degenerated into nested JSON and never ended)."""
    answer = reply["answer"]
    if i % 3 == 0:
        return f"Thank you so much for reaching out! {answer} Have a wonderful day!"
    if i % 3 == 1:  # the right object, wrapped in chat: the turn should end at its "}"
        whole = json.dumps(reply, ensure_ascii=False)
        return f"Sure! Here is the JSON you asked for: {whole} Anything else I can help with?"
    return f"Category: {reply['category']}. Priority: {reply['priority']}. {answer}"


def build() -> list[dict[str, object]]:
    """The preference rows, in the source's order."""
    from studio.data import pii

    rows, seen = [], set()
    for line in SOURCE.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        if len(rows) == ROWS:
            break
        if len(users) != 1 or len(users[0]) > MAX_USER_CHARS or users[0] in seen:
            continue
        if not (users[0] + messages[-1]["content"]).isascii():  # English only: see the docstring
            continue
        if pii.scan_text(users[0]):
            continue
        seen.add(users[0])
        reply = json.loads(messages[-1]["content"])
        reply["answer"] = short_answer(reply["answer"])
        rows.append(
            {
                "prompt": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": users[0]},
                ],
                "chosen": json.dumps(reply, ensure_ascii=False),
                "rejected": rejected_for(len(rows), reply),
            }
        )
    return rows


if __name__ == "__main__":
    built = build()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in built)
    TARGET.write_text(text, encoding="utf-8")
    print(f"{TARGET}: {len(built)} rows")
