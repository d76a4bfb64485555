"""Scores of an answer against its reference: exact match, BLEU, chrF, ROUGE-L, JSON format.

Below both users: batch compare (`studio.chat.evaluate`) scores rows with them, and the
training checks (`studio.train.checks`) read the dataset's answer format with them, so the
two agree on what "the same answer" and "a JSON answer" mean. sacrebleu and rouge-score are
imported on the first score, not with this module.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from typing import Any

# Scripts written without spaces: each character counts as one token for ROUGE-L.
_NO_SPACE = re.compile(
    r"[\u0E00-\u0EFF\u1000-\u109F\u1780-\u17FF\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uAC00-\uD7AF]"
)
_TOKEN = re.compile(
    r"[\u0E00-\u0EFF\u1000-\u109F\u1780-\u17FF\u3040-\u30FF\u3400-\u4DBF\u4E00-\u9FFF\uAC00-\uD7AF]|[^\W_]+"
)


def normalize_text(text: str) -> str:
    """NFC, trimmed, inner whitespace collapsed (what exact match compares)."""
    return " ".join(unicodedata.normalize("NFC", text or "").split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_text(prediction) == normalize_text(reference)


def rouge_tokens(text: str) -> list[str]:
    """Lower-cased word tokens; Thai/CJK and other space-less scripts split per character."""
    return _TOKEN.findall(unicodedata.normalize("NFC", text or "").lower())


class _KeepScriptsTokenizer:
    """rouge-score's tokenizer interface over `rouge_tokens`.

    rouge-score's default tokenizer keeps only [a-z0-9]: Vietnamese loses every accented
    letter ("chào" -> "ch", "o") and Thai text vanishes entirely, so two different Thai
    answers would score 0 or 1 by accident. This one keeps every script (Thai, Lao, CJK, ...
    per character, since they are written without spaces).
    """

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokens(text)


@functools.cache
def _scorers() -> tuple[Any, Any, Any]:
    """rouge-score's ROUGE-L and sacrebleu's sentence BLEU and chrF, built once (lazily)."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_KeepScriptsTokenizer())
    # effective_order: a short answer with no 4-gram match still gets a sentence score
    return rouge, BLEU(effective_order=True), CHRF()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (rouge-score, with a tokenizer that keeps every script), 0..1."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 1.0 if not pred and not ref else 0.0
    return float(_scorers()[0].score(reference, prediction)["rougeL"].fmeasure)


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU (sacrebleu, its default 13a tokenizer), 0..100. Word-level: weak for
    Thai, which has no spaces between words; read chrF there."""
    return float(_scorers()[1].sentence_score(prediction or "", [reference or ""]).score)


def chrf(prediction: str, reference: str) -> float:
    """chrF (sacrebleu): character n-gram F-score, 0..100; suits Vietnamese and Thai."""
    return float(_scorers()[2].sentence_score(prediction or "", [reference or ""]).score)


def parse_json_object(text: str) -> dict[str, Any] | None:
    """A JSON object from a model's answer: the whole text, or inside one ``` fence."""
    text = (text or "").strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S | re.I)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def json_format_ok(prediction: str, reference: str) -> bool | None:
    """None when the reference is not a JSON object; else whether the prediction parses as
    a JSON object carrying every key of the reference (the format a fine-tune should learn)."""
    ref = parse_json_object(reference)
    if ref is None:
        return None
    pred = parse_json_object(prediction)
    return pred is not None and set(ref) <= set(pred)


# Per-row scores, in the order batch compare shows them.
SCORES = ("exact_match", "bleu", "chrf", "rouge_l", "json_ok")


def score(prediction: str, reference: str | None) -> dict[str, Any]:
    """Per-row scores; all None when there is no reference."""
    if reference is None or not str(reference).strip():
        return dict.fromkeys(SCORES)
    return {
        "exact_match": exact_match(prediction, reference),
        "bleu": round(bleu(prediction, reference), 2),
        "chrf": round(chrf(prediction, reference), 2),
        "rouge_l": round(rouge_l(prediction, reference), 4),
        "json_ok": json_format_ok(prediction, reference),
    }
