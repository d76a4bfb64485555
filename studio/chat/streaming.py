"""Streaming a generation as the user reads it: one side's text as it comes (eager for Thai,
Lao, Khmer, Myanmar and Japanese, written without spaces), a batch's rows split into their own
panels, and the Stop flag `generate` checks every step. Used by `studio.chat.engine`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any


def streamer_class():
    """TextIteratorStreamer that also flushes Thai/Lao/Khmer/Myanmar/Japanese text eagerly.

    The stock streamer only releases text at spaces (or CJK ideographs), so a Thai answer,
    written without spaces, would arrive all at once at the end. It also records when the
    first generated token came and how many there were.
    """
    from transformers import TextIteratorStreamer

    class _Streamer(TextIteratorStreamer):
        def __init__(self, tokenizer: Any, **kw: Any) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True, **kw)
            self.started = time.perf_counter()
            self.first_token_at: float | None = None
            self.new_tokens = 0

        def put(self, value: Any) -> None:
            if not self.next_tokens_are_prompt:
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.new_tokens += int(value.numel())
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if stream_end:  # cut by max_new_tokens inside a multi-byte character
                text = text.rstrip("\ufffd")
            super().on_finalized_text(text, stream_end)

        def _is_chinese_char(self, cp: int) -> bool:
            no_space_scripts = (
                (0x0E00, 0x0EFF),  # Thai, Lao
                (0x1000, 0x109F),  # Myanmar
                (0x1780, 0x17FF),  # Khmer
                (0x3040, 0x30FF),  # Hiragana, Katakana
            )
            return super()._is_chinese_char(cp) or any(a <= cp <= b for a, b in no_space_scripts)

    return _Streamer


def stop_criteria(event: threading.Event):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopFlag(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full(
                (input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device
            )

    return StoppingCriteriaList([_StopFlag()])


class _TaggedQueue:
    """One row's text queue inside a batch: puts (row, item) on the batch's shared queue."""

    def __init__(self, shared: Any, row: int) -> None:
        self.shared, self.row = shared, row

    def put(self, item: Any, timeout: float | None = None) -> None:
        self.shared.put((self.row, item), timeout=timeout)


def rows_streamer(tok: Any, n_rows: int, ends: set[int]):
    """A streamer for a batch of `n_rows`: splits each step's tokens by row, so each panel
    streams its own text, and ends a row at its own end-of-turn token (`generate` goes on
    feeding a finished row padding until the whole batch is done; those are dropped here).

    Each row is the one-row streamer (`streamer_class`: eager Thai, first-token time, token
    count), so a row's text is decoded exactly as that side alone would decode it.
    """
    import queue

    from transformers.generation.streamers import BaseStreamer

    row_class = streamer_class()

    class _Rows(BaseStreamer):
        def __init__(self) -> None:
            self.queue: queue.Queue = queue.Queue()
            self.rows = [row_class(tok) for _ in range(n_rows)]
            for i, row in enumerate(self.rows):
                row.text_queue = _TaggedQueue(self.queue, i)
            self.done = [False] * n_rows
            self.by_end_token = [False] * n_rows  # ended by its own end-of-turn token
            self.ended_at: list[float | None] = [None] * n_rows

        def put(self, value: Any) -> None:
            value = value.reshape(n_rows, -1)
            for i, row in enumerate(self.rows):
                if self.done[i]:
                    continue
                prompt = row.next_tokens_are_prompt
                row.put(value[i])
                if not prompt and int(value[i, -1]) in ends:
                    self.by_end_token[i] = True
                    self._finish(i)

        def _finish(self, i: int) -> None:
            self.done[i] = True
            self.ended_at[i] = time.perf_counter()
            self.rows[i].end()

        def end(self) -> None:
            for i in range(n_rows):
                if not self.done[i]:
                    self._finish(i)

        def __iter__(self) -> Iterator[tuple[int, str]]:
            live = n_rows
            while live:
                row, text = self.queue.get()
                if text is None:  # the row streamer's stop signal
                    live -= 1
                elif text:
                    yield row, text

    return _Rows()
