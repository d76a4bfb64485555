"""The loss mask against the real chat templates of the model families people train.

The templates are read at test time from llama.cpp's `models/templates/` inside the
llama-cpp-python source release that the GGUF export already fetches (once per machine:
tests/conftest.py shares the models cache), and put on a copy of the embedded SmolLM2
tokenizer. Each case checks that the trained tokens decode to exactly the assistant replies,
each followed by the end-of-turn marker read by hand from that template (table below).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

from studio.data import chat_format
from studio.export import gguf as export

EOS = "EOS"  # the template writes `{{ eos_token }}`: the marker is the tokenizer's own EOS

# Template file (without .jinja) -> the text it writes right after an assistant reply.
MARKERS = {
    "Qwen-Qwen2.5-7B-Instruct": "<|im_end|>",
    "Qwen-Qwen3-0.6B": "<|im_end|>",
    "Qwen3.5-4B": "<|im_end|>",
    "google-gemma-2-2b-it": "<end_of_turn>",
    "google-gemma-4-31B-it": "<turn|>",
    "meta-llama-Llama-3.1-8B-Instruct": "<|eot_id|>",
    "meta-llama-Llama-3.2-3B-Instruct": "<|eot_id|>",
    "meta-llama-Llama-3.3-70B-Instruct": "<|eot_id|>",
    "microsoft-Phi-3.5-mini-instruct": "<|end|>",
    "mistralai-Mistral-Nemo-Instruct-2407": EOS,
    "Mistral-Small-3.2-24B-Instruct-2506": EOS,
    "HuggingFaceTB-SmolLM3-3B": "<|im_end|>",
    "ibm-granite-granite-3.3-2B-Instruct": "<|end_of_text|>",
    "ibm-granite-granite-4.0": "<|end_of_text|>",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "<｜end▁of▁sentence｜>",
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B": "<｜end▁of▁sentence｜>",
}

SYSTEM = {"role": "system", "content": "You are a terse geography tutor."}
TURN_1 = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
]
TURN_2 = [
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid, of course."},
]
CONVERSATIONS = {
    "single": TURN_1,
    "multi": TURN_1 + TURN_2,
    "system-single": [SYSTEM, *TURN_1],
    "system-multi": [SYSTEM, *TURN_1, *TURN_2],
}


@pytest.fixture(scope="module")
def templates_dir(studio_home: Path) -> Path:
    """llama.cpp's templates folder from the converter the export fetches (cached)."""
    folder = export.ensure_gguf_converter().parent / "models" / "templates"
    if not folder.is_dir() and not os.environ.get(export.CONVERTER_ENV):
        # A converter cached before the templates were kept: unpack it once more.
        (export.converter_dir() / export._CONVERTER_DONE).unlink(missing_ok=True)
        folder = export.ensure_gguf_converter().parent / "models" / "templates"
    assert folder.is_dir(), f"no chat templates in {folder.parent.parent}"
    return folder


@pytest.fixture(scope="module")
def with_template(tokenizer, templates_dir: Path):
    """Factory: a copy of the embedded tokenizer wearing one family's real template.

    With `special=True` the family's marker is also made one special token, as it is in that
    family's own tokenizer; left in pieces, byte-level BPE may glue its last characters to the
    next header's first (`|><|`), a token that straddles the turn boundary no real model sees.
    """
    made: dict[tuple[str, bool], Any] = {}

    def make(family: str, special: bool = True) -> Any:
        if (family, special) not in made:
            tok = copy.deepcopy(tokenizer)
            tok.chat_template = (templates_dir / f"{family}.jinja").read_text(encoding="utf-8")
            if special and MARKERS[family] != EOS:
                tok.add_tokens([MARKERS[family]], special_tokens=True)
            made[family, special] = tok
        return made[family, special]

    return make


def expected_marker(tok: Any, family: str) -> str:
    return tok.eos_token if MARKERS[family] == EOS else MARKERS[family]


def trained_text(tok: Any, messages: list[dict[str, str]]) -> str:
    tc = chat_format.tokenize_conversation(tok, messages)
    ids = [i for i, m in zip(tc.input_ids, tc.assistant_mask, strict=True) if m]
    return tok.decode(ids, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("shape", list(CONVERSATIONS))
@pytest.mark.parametrize("family", list(MARKERS))
def test_only_replies_and_their_marker_are_trained(with_template, family: str, shape: str) -> None:
    tok = with_template(family)
    messages = CONVERSATIONS[shape]
    marker = expected_marker(tok, family)
    want = "".join(m["content"] + marker for m in messages if m["role"] == "assistant")
    assert trained_text(tok, messages) == want


@pytest.mark.parametrize("family", list(MARKERS))
def test_marker_is_read_from_the_template_not_the_vocabulary(with_template, family: str) -> None:
    tok = with_template(family, special=False)
    marker = expected_marker(tok, family)
    assert chat_format.end_of_turn_marker(tok) == marker
    assert chat_format.end_of_turn_token(tok) == marker
    # Even in pieces the whole marker is trained after every reply.
    got = trained_text(tok, CONVERSATIONS["system-multi"])
    assert got.startswith(f"Paris is the capital of France.{marker}")
    assert f"Madrid, of course.{marker}" in got


def test_gemma2_folds_the_system_prompt_into_the_first_user_turn(with_template) -> None:
    tok = with_template("google-gemma-2-2b-it")
    messages = CONVERSATIONS["system-multi"]
    text = chat_format.render(tok, messages)
    assert "<start_of_turn>user\nYou are a terse geography tutor.\n\nWhat is the capital" in text
    assert text.count("You are a terse geography tutor.") == 1
    assert trained_text(tok, messages) == (
        "Paris is the capital of France.<end_of_turn>Madrid, of course.<end_of_turn>"
    )
    assert chat_format.template_notes(tok) == [chat_format.FOLD_NOTE]
    assert "has no system role" in chat_format.FOLD_NOTE
    assert chat_format.template_notes(with_template("Qwen-Qwen2.5-7B-Instruct")) == []


def test_a_template_that_leaves_out_the_system_prompt_is_reported(with_template) -> None:
    # Mistral Nemo writes the system prompt only before the last user message, so a training
    # row (ending with a reply) never shows it; the replies are still trained exactly.
    tok = with_template("mistralai-Mistral-Nemo-Instruct-2407")
    assert chat_format.template_notes(tok) == [chat_format.DROP_NOTE]
    assert "You are a terse" not in chat_format.render(tok, CONVERSATIONS["system-multi"])


@pytest.mark.parametrize(
    "family", ["Qwen-Qwen3-0.6B", "meta-llama-Llama-3.1-8B-Instruct", "google-gemma-2-2b-it"]
)
def test_reply_quoted_in_a_user_turn_is_trained_only_as_the_reply(
    with_template, family: str
) -> None:
    tok = with_template(family)
    reply = "Paris is the capital of France."
    messages = [
        {"role": "user", "content": f"Repeat after me: {reply}"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": reply},
        {"role": "assistant", "content": "Madrid, of course."},
    ]
    text, spans = chat_format.assistant_spans(tok, messages)
    marker = expected_marker(tok, family)
    assert [text[s:e] for s, e in spans] == [reply + marker, "Madrid, of course." + marker]
    assert spans[0][0] > text.index(f"me: {reply}")
    assert trained_text(tok, messages) == f"{reply}{marker}Madrid, of course.{marker}"


def test_a_template_with_no_marker_gets_eos_appended_and_trained(tokenizer) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert chat_format.end_of_turn_marker(tok) is None
    assert chat_format.end_of_turn_token(tok) == tok.eos_token
    tc = chat_format.tokenize_conversation(tok, CONVERSATIONS["multi"])
    assert tc.input_ids[-1] == tok.eos_token_id and tc.assistant_mask[-1] == 1
    trained = [i for i, m in zip(tc.input_ids, tc.assistant_mask, strict=True) if m]
    assert tok.decode(trained).endswith("Madrid, of course.\n" + tok.eos_token)
