"""The tokenization cache: a Start with the same data and settings reuses the tokens, and
anything that changes the tokens changes the key (so a cached tokenization is never stale)."""

from __future__ import annotations

from pathlib import Path

from studio.config import RunConfig
from studio.train.prepare import (
    PreparedRun,
    load_token_cache,
    save_token_cache,
    token_cache_key,
    tokenize_rows,
)


def _rows(answer: str = '{"category": "shipping"}') -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Where is parcel {i}?"},
                {"role": "assistant", "content": answer},
            ]
        }
        for i in range(4)
    ]


def _run(tmp_path: Path, rows: list[dict] | None = None, n_val: int = 1, **cfg) -> PreparedRun:
    rows = rows or _rows()
    cfg_ = RunConfig(**{"max_seq_len": 64, **cfg})
    return PreparedRun(cfg_, tmp_path, rows[n_val:], rows[:n_val], "cpu", "test")


def test_the_key_changes_with_everything_that_changes_the_tokens(tokenizer, tmp_path) -> None:
    key = token_cache_key(tokenizer, _run(tmp_path))
    assert key == token_cache_key(tokenizer, _run(tmp_path))  # same data and settings
    changed = {
        "max length": _run(tmp_path, max_seq_len=32),
        "loss mask": _run(tmp_path, assistant_only_loss=False),
        "row content": _run(tmp_path, _rows('{"category": "billing"}')),
        "split": _run(tmp_path, n_val=2),
    }
    for what, run in changed.items():
        assert token_cache_key(tokenizer, run) != key, what
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = original.replace("<|im_start|>", "<|im_start|> ")
        assert token_cache_key(tokenizer, _run(tmp_path)) != key, "chat template"
    finally:
        tokenizer.chat_template = original


def test_a_cached_tokenization_comes_back_whole(tokenizer, tmp_path, studio_home) -> None:
    run = _run(tmp_path)
    train, train_stats = tokenize_rows(tokenizer, run.train_rows, run.cfg)
    val, val_stats = tokenize_rows(tokenizer, run.val_rows, run.cfg, required=False)
    key = token_cache_key(tokenizer, run)
    save_token_cache(key, (train, train_stats, val, val_stats))
    assert load_token_cache(key) == (train, train_stats, val, val_stats)
    assert load_token_cache("0" * 32) is None  # nothing cached under another key
    cached = studio_home / "cache" / "tokens" / f"{key}.json"
    cached.write_text(cached.read_text(encoding="utf-8")[:-10], encoding="utf-8")  # torn
    assert load_token_cache(key) is None  # tokenized again, never half-read
