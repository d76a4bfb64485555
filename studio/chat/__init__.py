"""Stage 4, chat: the base model and base + adapter side by side, and their evaluation.

- `engine`: resolve a run or adapter, load base + adapter once, stream both sides, Stop, unload.
- `evaluate`: scores, blind votes, batch compare (prompt files and validation splits).

The memory/speed benchmark behind `python -m studio.bench chat` is `studio.tools.chat`.

The names the Chat tab uses are re-exported here, so `from studio import chat` is its one
import; each still has its home in the module above.
"""

from studio.chat.engine import (
    NO_TUNED,
    PRECISION_4,
    PRECISION_16,
    PRECISION_AUTO,
    PRECISIONS,
    SIDE_BASE,
    SIDE_LABELS,
    SIDE_TUNED,
    SIDES,
    ChatEngine,
    ChatError,
    ChatSource,
    GenerationSettings,
    GenerationStats,
    LoadInfo,
    resolve_adapter,
    with_system,
)
from studio.chat.evaluate import (
    VOTES,
    VOTES_FILE,
    BatchItem,
    BatchResult,
    VotePairs,
    batch_compare,
    blind_tally,
    load_prompt_file,
    new_blind_assignment,
    record_blind_vote,
    summarize,
    validation_items,
    votes_to_pairs,
    write_csv,
)

__all__ = [
    "NO_TUNED",
    "PRECISIONS",
    "PRECISION_4",
    "PRECISION_16",
    "PRECISION_AUTO",
    "SIDES",
    "SIDE_BASE",
    "SIDE_LABELS",
    "SIDE_TUNED",
    "VOTES",
    "VOTES_FILE",
    "BatchItem",
    "BatchResult",
    "ChatEngine",
    "ChatError",
    "ChatSource",
    "GenerationSettings",
    "GenerationStats",
    "LoadInfo",
    "VotePairs",
    "batch_compare",
    "blind_tally",
    "load_prompt_file",
    "new_blind_assignment",
    "record_blind_vote",
    "resolve_adapter",
    "summarize",
    "validation_items",
    "votes_to_pairs",
    "with_system",
    "write_csv",
]
