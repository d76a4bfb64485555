"""The Chat tab, split by what the user does there.

- `tab`: build and wire the tab; pick a run and Load / Unload it;
- `conversation`: one message to both sides, streamed into two panels;
- `blind`: blind mode's votes and tally;
- `batch`: batch compare of a prompt set, scored and saved as CSV.
"""

from studio.ui.chat.tab import build_chat_tab, wire_chat_tab

__all__ = ["build_chat_tab", "wire_chat_tab"]
