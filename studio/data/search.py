"""Search and paging over a loaded dataset's rows, for the Dataset tab's row browser."""

from __future__ import annotations

from typing import Any

from studio.data.normalize import Row


def search_rows(
    rows: list[Row],
    row_numbers: list[int],
    query: str = "",
    page: int = 1,
    page_size: int = 20,
    max_chars: int = 400,
) -> dict[str, Any]:
    """One page of the rows whose text contains `query` (any case) or whose line is `query`.

    Returns plain records (line, turns, system, user, assistant) for a table, texts cut to
    `max_chars`, plus the number of matches and pages.
    """
    q = (query or "").strip().casefold()
    if q:
        # isdecimal, not isdigit: "²" and "①" are digits that int() refuses.
        line_q = int(q) if q.isdecimal() else None
        hits = [
            i
            for i, row in enumerate(rows)
            if row_numbers[i] == line_q
            or any(q in m["content"].casefold() for m in row["messages"])
        ]
    else:
        hits = list(range(len(rows)))
    pages = max(1, -(-len(hits) // page_size))
    page = max(1, min(int(page or 1), pages))

    def cut(texts: list[str]) -> str:
        text = "\n---\n".join(texts)
        return text if len(text) <= max_chars else text[: max_chars - 1] + "…"

    items = []
    for i in hits[(page - 1) * page_size : page * page_size]:
        msgs = rows[i]["messages"]
        items.append(
            {
                "line": row_numbers[i],
                "turns": sum(m["role"] != "system" for m in msgs),
                "system": cut([m["content"] for m in msgs if m["role"] == "system"]),
                "user": cut([m["content"] for m in msgs if m["role"] == "user"]),
                "assistant": cut([_reply(m) for m in msgs if m["role"] == "assistant"]),
            }
        )
    return {"items": items, "matches": len(hits), "page": page, "pages": pages}


def _reply(message: dict[str, Any]) -> str:
    """A reply as the row browser lists it: a weight-0 reply (context only) says so."""
    if message.get("weight") == 0:
        return f"(weight 0, not trained) {message['content']}"
    return message["content"]
