"""How `support_preferences.jsonl` was made from `support_tickets.jsonl` (rerun to rebuild it).

`python -m studio.data.sample_data.build_preferences` writes the bundled preference sample:
the first 60 short single-question tickets without contact details (the PII gate stays green), with
a short system prompt asking for JSON. `chosen` is the ticket's JSON reply with its answer cut
to its first clause (short rows keep a CPU step short); `rejected` is the same content in a
form the prompt did not ask for, in turn: chatty prose, JSON cut off mid-string, or labelled
plain text. So the checkable property of a good answer is "parses as a JSON object".
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
MAX_USER_CHARS = 90  # short questions: a DPO step on a CPU costs by the token


def short_answer(text: str) -> str:
    """The answer's first clause, at most MAX_WORDS words, ending in a full stop."""
    clause = re.split(r"[;.!?]\s|[;:]", text, maxsplit=1)[0].strip().rstrip(",.")
    words = clause.split()
    return " ".join(words[:MAX_WORDS]).rstrip(",") + "."


def rejected_for(i: int, reply: dict[str, str]) -> str:
    """A worse reply with the same content: prose, broken JSON or labelled text, in turn."""
    answer = reply["answer"]
    if i % 3 == 0:
        return f"Thank you so much for reaching out! {answer} Have a wonderful day!"
    if i % 3 == 1:
        whole = json.dumps(reply, ensure_ascii=False)
        return whole[: max(20, len(whole) * 2 // 3)]
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
