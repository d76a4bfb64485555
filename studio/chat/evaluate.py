"""Evaluate a fine-tune against its base: scores, blind votes and batch compare.

Headless, on top of `studio.chat.engine` (the Chat tab is a thin layer over both):
- scores per row (`studio.data.scores`: exact match, BLEU, chrF, ROUGE-L, JSON format),
  summed up per side;
- blind mode: random hidden sides, votes appended to `<run>/blind_votes.jsonl` with the tally;
- batch compare: a run's validation split or a prompt file through both sides, scored and
  saved as `<run>/compare-<timestamp>.csv`.

Prompt files are read by `studio.data.load.read_records`, the Dataset tab's own parser, so
there is one parser for every dataset file; only the mapping of a row to a prompt is here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from studio import paths, runs
from studio.chat.engine import (
    SIDE_BASE,
    SIDE_TUNED,
    SIDES,
    ChatEngine,
    ChatError,
    GenerationSettings,
    Message,
)
from studio.data import load as data_load
from studio.data.normalize import guess_record_format, normalize_record
from studio.data.scores import score
from studio.data.table import write_csv as write_table_csv
from studio.util import new_path

VOTES = ("A", "B", "tie")
VOTES_FILE = "blind_votes.jsonl"

BatchProgress = Callable[[int, int, str], None]


# --------------------------------------------------------------------------- blind mode


def new_blind_assignment(rng: random.Random | None = None) -> dict[str, str]:
    """Which side each hidden panel shows: {"A": "base"|"tuned", "B": the other}."""
    rng = rng or random.SystemRandom()
    first, second = SIDES if rng.random() < 0.5 else SIDES[::-1]
    return {"A": first, "B": second}


def blind_tally(out_dir: str | Path) -> dict[str, Any]:
    """Count the votes saved in `<run>/blind_votes.jsonl` (unreadable lines are skipped).

    adapter_win_rate counts a tie as half a win, the usual convention for pairwise votes.
    """
    tally = {"tuned_wins": 0, "base_wins": 0, "ties": 0, "total": 0}
    path = Path(out_dir) / VOTES_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").split("\n"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            winner = rec.get("winner") if isinstance(rec, dict) else None
            key = {"tuned": "tuned_wins", "base": "base_wins", "tie": "ties"}.get(winner)
            if key:
                tally[key] += 1
                tally["total"] += 1
    total = tally["total"]
    tally["adapter_win_rate"] = (
        round((tally["tuned_wins"] + 0.5 * tally["ties"]) / total, 4) if total else None
    )
    return tally


def record_blind_vote(
    out_dir: str | Path,
    vote: str,
    assignment: dict[str, str],
    *,
    prompt: str = "",
    answers: dict[str, str] | None = None,
    settings: GenerationSettings | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Append one vote (and the tally after it) to `<run>/blind_votes.jsonl`; return the tally.

    The file is only ever appended to, so earlier votes are never lost.
    """
    if vote not in VOTES:
        raise ChatError(f"vote: use one of {', '.join(VOTES)}")
    if sorted(assignment.values()) != sorted(SIDES) or set(assignment) != {"A", "B"}:
        raise ChatError("blind assignment must map A and B to the base and fine-tuned sides")
    winner = "tie" if vote == "tie" else assignment[vote]
    before = blind_tally(out_dir)
    key = {"tuned": "tuned_wins", "base": "base_wins", "tie": "ties"}[winner]
    after = dict(before)
    after[key] += 1
    after["total"] += 1
    after["adapter_win_rate"] = round(
        (after["tuned_wins"] + 0.5 * after["ties"]) / after["total"], 4
    )
    record = {
        "time": datetime.now().isoformat(timespec="seconds"),
        "adapter": label,
        "vote": vote,
        "winner": winner,
        "assignment": assignment,
        "prompt": prompt,
        "answers": answers or {},
        "settings": asdict(settings) if settings else None,
        "tally": after,
    }
    path = Path(out_dir) / VOTES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return after


@dataclass
class VotePairs:
    """A preference dataset made from blind votes: where it is and what went into it."""

    path: Path
    pairs: int
    ties: int  # left out: a tie prefers neither answer
    skipped: int  # left out: unreadable, no prompt, or both answers the same


def votes_to_pairs(out_dir: str | Path, label: str = "") -> VotePairs:
    """Write the blind votes of `<out_dir>/blind_votes.jsonl` as a new preference dataset.

    Each decided vote becomes one row: the prompt, the winner's answer as `chosen`, the
    loser's as `rejected`; ties and unusable votes are left out. The rows record their origin
    (`meta`: the votes file, the adapter, when and which side won), and the file goes to the
    data dir's datasets/ under a new name, never over an earlier one. The Dataset tab and
    training read it through the same loader and checks as any file. ChatError when no vote
    can become a pair.
    """
    source = Path(out_dir) / VOTES_FILE
    if not source.is_file():
        raise ChatError(f"{source}: no blind votes yet; vote in blind mode first")
    rows, ties, skipped = [], 0, 0
    for line in source.read_text(encoding="utf-8").splitlines():
        row, why = _vote_row(line, source, label)
        if row is not None:
            rows.append(row)
        elif why == "tie":
            ties += 1
        elif why:
            skipped += 1
    if not rows:
        raise ChatError(
            f"{source}: no vote picked a winner ({ties} ties, {skipped} unusable): a"
            " preference pair needs an 'A is better' or 'B is better' vote"
        )
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    stem = "votes-" + (Path(out_dir).name or "chat")
    path = new_path(paths.datasets_dir(), stem, ".jsonl", create=_exclusive(text))
    return VotePairs(path, len(rows), ties, skipped)


def _vote_row(line: str, source: Path, label: str) -> tuple[dict[str, Any] | None, str]:
    """One vote line as a preference row, or (None, why: "tie", "skip" or "" for a blank)."""
    if not line.strip():
        return None, ""
    try:
        rec = json.loads(line)
    except ValueError:
        return None, "skip"
    winner = rec.get("winner") if isinstance(rec, dict) else None
    if winner == "tie":
        return None, "tie"
    answers = rec.get("answers") or {}
    if winner not in SIDES or not isinstance(answers, dict):
        return None, "skip"
    loser = SIDE_BASE if winner == SIDE_TUNED else SIDE_TUNED
    chosen, rejected = str(answers.get(winner) or ""), str(answers.get(loser) or "")
    prompt = str(rec.get("prompt") or "")
    if not prompt.strip() or not chosen.strip() or not rejected.strip() or chosen == rejected:
        return None, "skip"
    meta = {
        "origin": "blind votes",
        "votes_file": str(source),
        "adapter": rec.get("adapter") or label,
        "voted": rec.get("time"),
        "winner": winner,
    }
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta}, ""


def _exclusive(text: str) -> Callable[[Path], object]:
    """A `new_path` creator that writes `text` to a name nobody holds (exclusive open)."""

    def create(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8", newline="\n") as fh:
            fh.write(text)

    return create


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall scores per side: means over rows that have a (JSON) reference."""
    out: dict[str, Any] = {"rows": len(rows)}
    out["with_reference"] = sum(1 for r in rows if r.get("reference"))
    out["json_references"] = sum(1 for r in rows if r.get("base_json_ok") is not None)
    for side in ("base", "tuned"):
        out[f"{side}_exact_match"] = _mean([r.get(f"{side}_exact_match") for r in rows])
        out[f"{side}_rouge_l"] = _mean([r.get(f"{side}_rouge_l") for r in rows])
        out[f"{side}_bleu"] = _mean([r.get(f"{side}_bleu") for r in rows])
        out[f"{side}_chrf"] = _mean([r.get(f"{side}_chrf") for r in rows])
        out[f"{side}_json_format"] = _mean([r.get(f"{side}_json_ok") for r in rows])
    return out


# --------------------------------------------------------------------------- batch compare


@dataclass
class BatchItem:
    """One prompt (a conversation without its final answer) and the expected answer."""

    messages: list[Message]
    reference: str | None = None

    @property
    def prompt(self) -> str:
        users = [m.get("content", "") for m in self.messages if m.get("role") == "user"]
        return (
            users[-1] if users else (self.messages[-1].get("content", "") if self.messages else "")
        )


@dataclass
class BatchResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    csv_path: Path | None
    stopped: bool = False
    error: str | None = None  # why the batch ended early, when something other than Stop


CSV_COLUMNS = [
    "prompt",
    "reference",
    "base",
    "fine_tuned",
    "base_exact_match",
    "tuned_exact_match",
    "base_bleu",
    "tuned_bleu",
    "base_chrf",
    "tuned_chrf",
    "base_rouge_l",
    "tuned_rouge_l",
    "base_json_ok",
    "tuned_json_ok",
]

_PROMPT_KEYS = ("prompt", "question", "input_text", "query", "text")
_REFERENCE_KEYS = ("reference", "response", "answer", "output", "completion", "expected")
_PROMPT_FILE_HINT = (
    "A prompt file may also hold 'prompt' (and 'reference') fields or columns, or be .txt with"
    " one prompt per line."
)


def item_from_record(rec: Any, where: str) -> BatchItem:
    """A BatchItem from one JSON record: chat messages, ShareGPT or Alpaca (read by the
    dataset's own `normalize_record`, the last assistant turn being the reference), or
    prompt/reference fields."""
    if isinstance(rec, str):
        return BatchItem([{"role": "user", "content": rec}])
    if not isinstance(rec, dict):
        raise ChatError(f"{where}: expected a JSON object or string, got {type(rec).__name__}")
    fmt = guess_record_format(rec)
    if fmt == "alpaca" and "instruction" not in rec:
        fmt = None  # {"prompt", "output"}: a prompt with its reference, not an Alpaca row
    if fmt is not None:
        msgs, problems = normalize_record(rec, fmt, answer_required=False)
        if msgs is None:
            field, reason = problems[0]
            raise ChatError(f"{where}: {f'{field}: ' if field else ''}{reason}")
        reference = msgs.pop()["content"] if msgs[-1]["role"] == "assistant" else None
        return BatchItem(msgs, reference)
    key = next((k for k in _PROMPT_KEYS if isinstance(rec.get(k), str)), None)
    if key is None:
        raise ChatError(
            f"{where}: no prompt found; use a 'prompt' field (optionally 'reference'),"
            " chat 'messages', or Alpaca 'instruction'/'output'"
        )
    ref_key = next((k for k in _REFERENCE_KEYS if rec.get(k) is not None), None)
    ref = rec.get(ref_key) if ref_key else None
    if ref is not None and not isinstance(ref, str):
        ref = json.dumps(ref, ensure_ascii=False)  # a JSON reference given as an object
    return BatchItem([{"role": "user", "content": rec[key]}], ref)


def load_prompt_file(path: str | Path, limit: int | None = None) -> list[BatchItem]:
    """Prompts (with optional references) from .jsonl/.json/.csv/.tsv/.parquet/.txt.

    .txt: one prompt per line. Tables: a prompt column and optionally a reference column.
    JSON: chat messages (the last assistant turn is the reference), ShareGPT, Alpaca, or
    {"prompt": ..., "reference": ...}. Everything but .txt is read by the Dataset tab's
    parser. Errors name the file and line.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ChatError(f"{p}: no such file")
    if p.suffix.lower() == ".txt":
        items = _text_items(p)
    else:
        try:
            kind, columns, records = data_load.read_records(p)
        except data_load.DatasetError as exc:
            msg = str(exc) if str(exc).startswith(p.name) else f"{p.name}: {exc}"
            raise ChatError(f"{msg} {_PROMPT_FILE_HINT}") from exc
        if columns is not None:
            unit = "row" if kind == "parquet" else "line"
            items = _table_items(p, columns, records, unit, limit)
        else:
            items = _json_items(p, records, limit)
    if not items:
        raise ChatError(f"{p}: no prompts found")
    return items[:limit] if limit else items


def _text_items(path: Path) -> list[BatchItem]:
    """One prompt per non-blank line of a UTF-8 (or UTF-16 with BOM) text file, read a line at
    a time through the dataset reader's line reader, so a huge line is refused rather than
    read whole."""
    from studio.data.read import decode_line, open_utf8, read_lines

    items: list[BatchItem] = []
    try:
        with open_utf8(path) as f:
            for n, raw in enumerate(read_lines(f, path), start=1):
                if b"\x00" in raw:
                    raise ChatError(f"{path}: line {n} holds NUL bytes: not a text file")
                text = decode_line(raw.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw, path, n)
                if text.strip():
                    items.append(BatchItem([{"role": "user", "content": text.strip()}]))
    except data_load.DatasetError as exc:
        raise ChatError(str(exc)) from exc
    return items


def _json_items(path: Path, records: list[data_load.Record], limit: int | None) -> list[BatchItem]:
    """Items from parsed JSON/JSONL records; a record that did not parse stops with its line."""
    items: list[BatchItem] = []
    for line, rec, err in records:
        where = f"{path}: line {line}"
        if err is not None:
            raise ChatError(f"{where}: {err}")
        items.append(item_from_record(rec, where))
        if limit and len(items) >= limit:
            break
    return items


def _table_items(
    path: Path, columns: list[str], records: list[data_load.Record], unit: str, limit: int | None
) -> list[BatchItem]:
    """Items from CSV/Parquet rows: the prompt column (rows without a prompt are skipped) and
    the reference column when there is one."""
    cols = {c.lower().strip(): c for c in columns}
    pcol = next((cols[k] for k in _PROMPT_KEYS if k in cols), None)
    if pcol is None:
        header = "line 1: " if unit == "line" else ""
        raise ChatError(f"{path}: {header}no 'prompt' column (columns: {list(cols.values())})")
    rcol = next((cols[k] for k in _REFERENCE_KEYS if k in cols), None)
    items: list[BatchItem] = []
    for line, row, err in records:
        if err is not None:
            raise ChatError(f"{path}: {unit} {line}: {err}")
        prompt = _cell_text(row.get(pcol)).strip()
        if not prompt:
            continue
        ref = _cell_text(row.get(rcol)) if rcol else ""
        items.append(BatchItem([{"role": "user", "content": prompt}], ref or None))
        if limit and len(items) >= limit:
            break
    return items


def _cell_text(value: Any) -> str:
    """A table cell as text (Parquet cells may be numbers, lists or missing)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    # default=str: Parquet cells may be bytes or dates, which JSON has no type for.
    return json.dumps(value, ensure_ascii=False, default=str)


def validation_items(run_dir: str | Path, limit: int | None = None) -> list[BatchItem]:
    """The run's held-out validation rows: the same seeded split training made
    (`studio.data.load.run_split`, which refuses a dataset changed since training)."""
    from studio.data.load import ChangedDataError, run_split

    try:
        run = runs.open_run(run_dir)
        _, val_rows = run_split(run)
    except runs.RunError as exc:
        raise ChatError(str(exc)) from exc
    except ChangedDataError as exc:
        raise ChatError(f"{exc}; use a prompt file instead.") from exc
    if not val_rows:
        raise ChatError(
            f"{run.name} held out no validation rows (val_fraction 0); use a prompt file."
        )
    items = [
        item_from_record(r, f"{run.name} validation row {i + 1}") for i, r in enumerate(val_rows)
    ]
    return items[:limit] if limit else items


def write_csv(rows: list[dict[str, Any]], out_dir: str | Path) -> Path:
    """Save compare rows as a new `compare-<timestamp>.csv` (never overwriting one), UTF-8
    with a BOM so Excel shows Vietnamese and Thai answers right."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_table_csv(new_path(out, "compare", ".csv"), CSV_COLUMNS, rows)


PROMPTS_PER_CALL = 8  # prompts per generate call: 16 rows (both sides), modest padding and KV


def batch_compare(
    engine: ChatEngine,
    items: list[BatchItem],
    settings: GenerationSettings | None = None,
    *,
    system: str | None = None,
    out_dir: str | Path | None = None,
    progress: BatchProgress | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    expect_id: int | None = None,
    prompts_per_call: int = PROMPTS_PER_CALL,
) -> BatchResult:
    """Answer every item on both sides, score them, and save the table as CSV.

    Both sides of `prompts_per_call` prompts go through one `generate` call (the adapter
    switched per row, `ChatEngine.stream_rows`), so a batch takes a fraction of the time of
    one prompt and one side at a time; greedy answers are the same either way in fp32 (in
    bf16 a pick between two tokens within rounding may flip, as on any GPU).

    The batch holds the engine (`ChatEngine.hold_for_batch`): a Load or Unload meanwhile is
    refused, and the CSV goes to the run the batch started with. A Stop, or training taking
    the GPU (`release_for_training`), ends it after the current group of prompts; the rows
    done so far are still saved, and `error` says why it ended early. `system` applies only
    to items that bring no system message of their own; `on_row` sees each scored row as
    soon as it is done (the UI fills its table with it). `expect_id`: the `load_id` the
    caller picked its prompts for (refused when another load came in between).
    """
    settings = (settings or GenerationSettings()).validate()
    progress = progress or (lambda _d, _t, _m: None)
    size = max(1, int(prompts_per_call))
    with engine.hold_for_batch(expect_id) as held:
        engine.begin_turn()
        target = out_dir or held["out_dir"]
        rows, error = _batch_rows(
            engine, items, settings, system, progress, on_row, held["id"], size
        )
        stopped = engine.stopped or error is not None
    progress(len(rows), len(items), "Stopped" if stopped else "Done")
    csv_path = write_csv(rows, target) if target and rows else None
    return BatchResult(rows, summarize(rows), csv_path, stopped, error)


def _batch_rows(
    engine: ChatEngine,
    items: list[BatchItem],
    settings: GenerationSettings,
    system: str | None,
    progress: BatchProgress,
    on_row: Callable[[dict[str, Any]], None] | None,
    load_id: int,
    size: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """The scored rows until the end, a Stop, or the model going away (then with why)."""
    rows: list[dict[str, Any]] = []
    total = len(items)
    for start in range(0, total, size):
        group = items[start : start + size]
        progress(start, total, f"Prompts {start + 1}-{start + len(group)}/{total}")
        try:
            done = _compare_group(engine, group, settings, system)
        except ChatError as exc:
            return rows, str(exc)
        if done is not None:  # every answer came from the model the batch started with
            for row in done:
                rows.append(row)
                if on_row:
                    on_row(row)
        if engine.load_id != load_id:
            why = engine.unload_reason or "another model was loaded"
            return rows, f"The chat model was unloaded mid-batch: {why}."
        if done is None:
            break
    return rows, None


def _compare_group(
    engine: ChatEngine, group: list[BatchItem], settings: GenerationSettings, system: str | None
) -> list[dict[str, Any]] | None:
    """A group of items answered by both sides in one pass and scored; None when a Stop cut
    it short (its half-written answers are not kept)."""
    requests = []
    for item in group:
        has_system = bool(item.messages) and item.messages[0].get("role") == "system"
        requests += [(side, item.messages, None if has_system else system) for side in SIDES]
    answers = engine.generate_rows(requests, settings, new_turn=False)
    if engine.stopped:
        return None
    return [
        _scored_row(item, answers[2 * i].strip(), answers[2 * i + 1].strip())
        for i, item in enumerate(group)
    ]


def _scored_row(item: BatchItem, base: str, tuned: str) -> dict[str, Any]:
    """One CSV row: the prompt, the reference, both answers and their scores."""
    row: dict[str, Any] = {
        "prompt": item.prompt,
        "reference": item.reference or "",
        "base": base,
        "fine_tuned": tuned,
    }
    for side, answer in ((SIDE_BASE, base), (SIDE_TUNED, tuned)):
        for key, value in score(answer, item.reference).items():
            row[f"{side}_{key}"] = value
    return row
