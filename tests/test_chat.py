"""Chat: base vs fine-tuned from one loaded model, streaming, blind votes, batch scores.

The scoring, prompt-file and vote tests are pure and fast. The `slow` ones train a real
adapter with the studio's own training engine (a few steps on the sample dataset) and chat
with it through the real embedded SmolLM2.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import random
import threading
import types
import weakref
from pathlib import Path

import pytest

from studio import gpu
from studio.chat import engine as chat
from studio.chat import evaluate, streaming
from studio.data import scores
from studio.models import precision
from studio.tools import chat as measure

RUN_NAME = "chat-test"
SYSTEM = (
    "You are the support triage assistant of Lotus Shop. Reply with a JSON object with keys"
    " category, priority and answer."
)
TICKET = "I was charged twice for order 5521, please refund one of the payments."


# --------------------------------------------------------------------------- shared run


def train_chat_run(studio_home: Path) -> Path:
    """A LoRA run trained by studio.train (12 steps, lr 1e-3), reused within a session.

    Evaluation and intermediate checkpoints are pushed past the end to keep it short.
    """
    from studio import runs
    from studio.config import RunConfig
    from studio.train.jobs import run_training

    for info in runs.list_runs():
        if info.name.startswith(RUN_NAME + "-") and info.status == "completed":
            return info.path
    cfg = RunConfig(
        run_name=RUN_NAME,
        method="lora",
        max_steps=12,
        learning_rate=1e-3,
        max_seq_len=128,
        batch_size=4,
        val_fraction=0.1,
        eval_steps=1000,
        save_steps=1000,
        device="cpu",
        allow_pii=True,  # the sample's 6 planted PII findings are the Dataset tests' business
    )
    result = run_training(cfg)
    assert result.status == "completed", result.message
    return Path(result.run_dir)


@pytest.fixture(scope="module")
def run_dir(studio_home: Path, embedded_model) -> Path:
    return train_chat_run(studio_home)


@pytest.fixture(scope="module")
def engine(run_dir: Path):
    """The chat engine in fp32, on every CPU: these tests hold a batched answer to the very
    tokens of the same answer alone, which fp32 gives. In bf16 (a GPU, or a CPU with native
    bf16, where Chat runs in bf16) a batch's matmuls round in another order, so a greedy pick
    between two tokens within rounding of each other may flip, as on any GPU;
    `test_bf16_ab_turn_matches_alone_or_splits_at_a_near_tie` checks that case."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(precision.CPU_FP32_ENV, "1")
        eng = chat.ChatEngine()
        eng.load(run_dir)
        assert str(eng.model.dtype) == "torch.float32"
        eng.batch_sides = True  # batched though fp32 on a CPU would pick A then B by itself
        yield eng
        eng.unload()


GREEDY = chat.GenerationSettings(temperature=0.0, max_new_tokens=24)
TINY = chat.GenerationSettings(max_new_tokens=4)


def ticket_messages(text: str = TICKET) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- scores (fast)


def test_rouge_l_known_values():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" = "the cat on the mat" (5 of 6)
    score = scores.rouge_l("the cat sat on the mat", "the cat is on the mat")
    assert score == pytest.approx(5 / 6)
    assert scores.rouge_l("The  Cat.", "the cat") == 1.0  # case and punctuation ignored
    assert scores.rouge_l("dog", "the cat") == 0.0
    assert scores.rouge_l("", "") == 1.0
    assert scores.rouge_l("", "x") == 0.0
    # precision 2/2, recall 2/4 -> F1 = 2 * 1 * 0.5 / 1.5
    assert scores.rouge_l("a b", "a x b y") == pytest.approx(2 / 3)


def test_rouge_l_unicode_scripts():
    # Vietnamese words keep their diacritics; NFC and NFD spellings are the same text
    nfd = "Xin cha\u0300o ba\u0323n"
    assert scores.rouge_l(nfd, "Xin chào bạn") == 1.0
    assert scores.rouge_tokens("Xin chào bạn") == ["xin", "chào", "bạn"]
    # Thai has no spaces: characters are the units, so a partial match scores between 0 and 1
    tokens = scores.rouge_tokens("สวัสดีครับ")
    assert len(tokens) == len("สวัสดีครับ")
    score = scores.rouge_l("สวัสดีครับ", "สวัสดีค่ะ")
    assert 0.5 < score < 1.0


def test_exact_match_normalizes_whitespace_only():
    assert scores.exact_match("  Paris \n is  big ", "Paris is big")
    assert not scores.exact_match("paris is big", "Paris is big")


def test_json_format_accuracy_rules():
    ref = json.dumps({"category": "billing", "priority": "high", "answer": "Refunded."})
    good = '{"category": "account", "priority": "low", "answer": "x", "extra": 1}'
    assert scores.json_format_ok(good, ref) is True  # other values, same keys: format is right
    assert scores.json_format_ok('```json\n{"category": 1, "priority": 2, "answer": 3}\n```', ref)
    assert scores.json_format_ok('{"category": "billing", "priority": "high"}', ref) is False
    assert scores.json_format_ok('{"category": "billing",', ref) is False  # does not parse
    assert scores.json_format_ok("[1, 2]", ref) is False  # parses, not an object
    assert scores.json_format_ok("anything", "plain text reference") is None


def test_score_and_summary_on_known_rows():
    ref = '{"category": "billing", "priority": "high"}'
    rows = []
    for base, tuned in [("Sorry!", ref), ("{}", '{"category": "x", "priority": "y"}')]:
        row = {"prompt": "p", "reference": ref, "base": base, "fine_tuned": tuned}
        for side, text in (("base", base), ("tuned", tuned)):
            row.update({f"{side}_{k}": v for k, v in scores.score(text, ref).items()})
        rows.append(row)
    assert rows[0]["tuned_exact_match"] is True and rows[0]["base_exact_match"] is False
    assert rows[1]["base_json_ok"] is False and rows[1]["tuned_json_ok"] is True
    summary = evaluate.summarize(rows)
    assert summary["rows"] == 2 and summary["json_references"] == 2
    assert summary["base_exact_match"] == 0.0 and summary["tuned_exact_match"] == 0.5
    assert summary["base_json_format"] == 0.0 and summary["tuned_json_format"] == 1.0
    assert summary["tuned_rouge_l"] == pytest.approx(
        round((1.0 + scores.rouge_l(rows[1]["fine_tuned"], ref)) / 2, 4)
    )
    no_ref = {"exact_match": None, "bleu": None, "chrf": None, "rouge_l": None, "json_ok": None}
    assert scores.score("x", None) == no_ref


# --------------------------------------------------------------------------- inputs (fast)


def test_prompt_files_in_every_format(tmp_path: Path):
    jl = tmp_path / "p.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        {"prompt": "Xin chào", "reference": {"a": 1}},
        {"instruction": "Sum", "input": "1 2", "output": "3"},
        {"conversations": [{"from": "human", "value": "สวัสดี"}]},
    ]
    jl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", "utf-8")
    items = evaluate.load_prompt_file(jl)
    assert [i.prompt for i in items] == ["Hi", "Xin chào", "Sum\n\n1 2", "สวัสดี"]
    assert [i.reference for i in items] == ["Yo", '{"a": 1}', "3", None]
    assert items[0].messages == [{"role": "user", "content": "Hi"}]

    cs = tmp_path / "p.csv"
    cs.write_text("Prompt,Reference\nOne,1\n,skipped\nTwo,\n", "utf-8")
    assert [(i.prompt, i.reference) for i in evaluate.load_prompt_file(cs)] == [
        ("One", "1"),
        ("Two", None),
    ]
    tx = tmp_path / "p.txt"
    tx.write_text("first\n\nsecond\n", "utf-8")
    assert [i.prompt for i in evaluate.load_prompt_file(tx, limit=1)] == ["first"]


def test_csv_prompt_file_keeps_a_quoted_cell_with_a_newline(tmp_path: Path):
    """Prompt files go through the Dataset tab's parser: a quoted cell keeps its line break."""
    cs = tmp_path / "multi.csv"
    cs.write_text('prompt,reference\n"Line one\nline two","{""a"": 1}"\nNext,\n', "utf-8")
    assert [(i.prompt, i.reference) for i in evaluate.load_prompt_file(cs)] == [
        ("Line one\nline two", '{"a": 1}'),
        ("Next", None),
    ]


def test_prompt_files_in_json_and_parquet(tmp_path: Path):
    """A .json array (errors name its line) and a Parquet table, read by the data loader."""
    js = tmp_path / "p.json"
    js.write_text('[\n  {"prompt": "A", "answer": "1"},\n  "B",\n  {"title": "x"}\n]', "utf-8")
    assert [i.prompt for i in evaluate.load_prompt_file(js, limit=2)] == ["A", "B"]
    with pytest.raises(chat.ChatError, match=r"p\.json: line 4: no prompt found"):
        evaluate.load_prompt_file(js)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pa_path = tmp_path / "p.parquet"
    pq.write_table(
        pa.table({"Question": ["Q1", None, "Q2"], "expected": ["R1", "x", None]}), pa_path
    )
    got = [(i.prompt, i.reference) for i in evaluate.load_prompt_file(pa_path)]
    assert got == [("Q1", "R1"), ("Q2", None)]


def test_prompt_file_errors_say_where(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n', "utf-8")
    with pytest.raises(chat.ChatError, match=r"bad\.jsonl: line 2: invalid JSON"):
        evaluate.load_prompt_file(bad)
    nop = tmp_path / "nop.jsonl"
    nop.write_text('{"title": "no prompt here"}\n', "utf-8")
    with pytest.raises(chat.ChatError, match="line 1: no prompt found"):
        evaluate.load_prompt_file(nop)
    with pytest.raises(chat.ChatError, match="no such file"):
        evaluate.load_prompt_file(tmp_path / "missing.jsonl")
    nocol = tmp_path / "x.csv"
    nocol.write_text("a,b\n1,2\n", "utf-8")
    with pytest.raises(chat.ChatError, match="no 'prompt' column"):
        evaluate.load_prompt_file(nocol)


def test_settings_validation_and_kwargs(tokenizer):
    with pytest.raises(chat.ChatError, match="top_p"):
        chat.GenerationSettings(top_p=0).validate()
    with pytest.raises(chat.ChatError, match="max_new_tokens"):
        chat.GenerationSettings(max_new_tokens=0).validate()
    greedy = chat.GenerationSettings(temperature=0).generate_kwargs(tokenizer)
    assert greedy["do_sample"] is False
    sampled = chat.GenerationSettings(temperature=0.7, top_p=0.9).generate_kwargs(tokenizer)
    assert sampled["do_sample"] is True and sampled["top_p"] == 0.9


def test_system_prompt_replaces_the_first_one():
    msgs = [{"role": "system", "content": "old"}, {"role": "user", "content": "hi"}]
    assert chat.with_system(msgs, " new ")[0] == {"role": "system", "content": "new"}
    assert len(chat.with_system(msgs, "new")) == 2
    assert chat.with_system(msgs, "") == msgs


def test_resolve_adapter_errors(tmp_path: Path):
    with pytest.raises(chat.ChatError, match="no such folder"):
        chat.resolve_adapter(tmp_path / "nope")
    with pytest.raises(chat.ChatError, match="no adapter here"):
        chat.resolve_adapter(tmp_path)
    with pytest.raises(chat.ChatError, match="Pick a run"):
        chat.resolve_adapter("")


def test_streamer_releases_thai_text_before_the_end(tokenizer):
    """Thai has no spaces; the stock streamer would hold it all until the last token."""
    import torch

    text = "สวัสดีครับ ขอบคุณมากครับ"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    streamer = streaming.streamer_class()(tokenizer)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, skipped
    for i in ids:
        streamer.put(torch.tensor([i]))
    released_before_end = streamer.text_queue.qsize()
    streamer.end()
    chunks = [c for c in streamer if c]
    assert "".join(chunks) == text
    assert released_before_end >= 3 and streamer.new_tokens == len(ids)

    # cut inside a multi-byte character (max_new_tokens): no U+FFFD at the end of the answer
    cut = tokenizer("Tôi muốn đổi", add_special_tokens=False)["input_ids"]
    partial = [i for i in range(1, len(cut)) if "\ufffd" in tokenizer.decode(cut[:i])]
    assert partial, "this tokenizer splits Vietnamese letters across tokens"
    streamer = streaming.streamer_class()(tokenizer)
    streamer.put(torch.tensor([[1]]))
    for i in cut[: partial[-1]]:
        streamer.put(torch.tensor([i]))
    streamer.end()
    assert "".join(streamer) == "Tôi muốn đ"


# --------------------------------------------------------------------------- blind (fast)


def test_blind_votes_append_and_tally(tmp_path: Path):
    rng = random.Random(0)
    seen = {tuple(evaluate.new_blind_assignment(rng).items()) for _ in range(40)}
    assert seen == {(("A", "base"), ("B", "tuned")), (("A", "tuned"), ("B", "base"))}

    a_is_tuned = {"A": "tuned", "B": "base"}
    a_is_base = {"A": "base", "B": "tuned"}
    evaluate.record_blind_vote(tmp_path, "A", a_is_tuned, prompt="xin chào")  # tuned wins
    evaluate.record_blind_vote(tmp_path, "A", a_is_base)  # base wins
    evaluate.record_blind_vote(tmp_path, "B", a_is_base)  # tuned wins
    tally = evaluate.record_blind_vote(tmp_path, "tie", a_is_base)
    assert tally == {
        "tuned_wins": 2,
        "base_wins": 1,
        "ties": 1,
        "total": 4,
        "adapter_win_rate": 0.625,  # (2 + 0.5) / 4
    }
    assert evaluate.blind_tally(tmp_path) == tally
    lines = (tmp_path / evaluate.VOTES_FILE).read_text("utf-8").splitlines()
    assert len(lines) == 4  # appended, never rewritten
    first = json.loads(lines[0])
    assert first["winner"] == "tuned" and first["prompt"] == "xin chào"
    assert json.loads(lines[-1])["tally"] == tally
    with pytest.raises(chat.ChatError, match="vote"):
        evaluate.record_blind_vote(tmp_path, "C", a_is_base)
    with pytest.raises(chat.ChatError, match="assignment"):
        evaluate.record_blind_vote(tmp_path, "A", {"A": "base", "B": "base"})
    assert len((tmp_path / evaluate.VOTES_FILE).read_text("utf-8").splitlines()) == 4


# --------------------------------------------------------------------------- training guard


def test_chat_refused_while_a_gpu_run_trains(studio_home: Path):
    """A run folder held by a live training process on cuda blocks Load; on cpu it does not."""
    from studio import runs

    run = runs.new_run_dir("guard-test")
    meta = {"status": "running", "base_model": {"name": "x"}, "device": {"used": "cuda"}}
    runs.write_metadata(run, meta)
    runs.mark_live(run)
    try:
        assert "using the GPU" in (gpu.training_blocker() or "")
        with pytest.raises(chat.ChatError, match="using the GPU"):
            chat.ChatEngine().load(run)
        runs.write_metadata(run, {**meta, "device": {"used": "cpu"}})
        assert gpu.training_blocker() is None
    finally:
        runs.mark_done(run)
        runs.write_metadata(run, {**meta, "status": "failed"})
    assert gpu.training_blocker() is None


def test_a_training_check_that_fails_refuses_to_load(monkeypatch: pytest.MonkeyPatch, studio_home):
    """Fail closed: when the check for a GPU run raises, chat does not load (and says why)."""
    from studio import runs

    def unreadable() -> list:
        raise OSError("runs folder unreadable")

    monkeypatch.setattr(runs, "list_runs", unreadable)
    message = gpu.training_blocker() or ""
    assert "Could not check" in message and "runs folder unreadable" in message
    eng = chat.ChatEngine()
    with pytest.raises(chat.ChatError, match="Could not check"):
        eng.load_base_only()
    assert not eng.loaded and eng.base_loads == 0


# --------------------------------------------------------------------------- real model


def _reachable_tensor_bytes(root: object) -> int:
    """Bytes of every tensor storage reachable from `root` (each storage counted once)."""
    import torch

    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type(len))
    seen_obj: set[int] = set()
    seen_storage: set[int] = set()
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_obj or isinstance(obj, skip):
            continue
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen_storage:
                seen_storage.add(storage.data_ptr())
                total += storage.nbytes()
            continue
        stack.extend(gc.get_referents(obj))
    return total


@pytest.mark.slow
def test_greedy_sides_differ_and_base_side_is_the_plain_base(engine, embedded_model, tokenizer):
    import torch

    from studio.data.chat_format import render
    from studio.models.loader import load_model_for_inference

    a = engine.generate(chat.SIDE_BASE, ticket_messages(), GREEDY, system=SYSTEM)
    b = engine.generate(chat.SIDE_TUNED, ticket_messages(), GREEDY, system=SYSTEM)
    assert a.strip() and b.strip()
    assert a != b, "the adapter did not change the greedy answer"

    plain = load_model_for_inference(embedded_model.path)
    msgs = [{"role": "system", "content": SYSTEM}, *ticket_messages()]
    enc = tokenizer(render(tokenizer, msgs, True), add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = plain.generate(
            **enc,
            max_new_tokens=GREEDY.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    expected = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    expected = expected.rstrip("\ufffd")  # the engine drops a character cut in half at the end
    assert a == expected
    # repeatable: the same greedy question gives the same answers
    assert engine.generate(chat.SIDE_TUNED, ticket_messages(), GREEDY, system=SYSTEM) == b


def _plain_greedy(model, tok, text: str, max_new: int, base: bool) -> str:
    """transformers' own greedy `generate` on one prompt (adapter off for the base side)."""
    import contextlib

    import torch

    enc = tok(text, add_special_tokens=False, return_tensors="pt")
    off = model.disable_adapter() if base else contextlib.nullcontext()
    with off, torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id
        )
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return text.rstrip("\ufffd")  # the engine drops a character cut in half at the end


@pytest.mark.slow
def test_streaming_yields_text_in_pieces(engine):
    """The streamed pieces add up to what transformers' plain greedy `generate` gives for
    the same prompt, on each side (not to the engine's `generate`, which is built on it)."""
    settings = chat.GenerationSettings(max_new_tokens=24)
    msgs = ticket_messages("Hello! Who are you?")
    for side in chat.SIDES:
        chunks = list(engine.stream(side, msgs, settings))
        assert len([c for c in chunks if c]) >= 3
        plain = _plain_greedy(
            engine.model, engine.tokenizer, engine.prompt_text(msgs), 24, side == chat.SIDE_BASE
        )
        assert "".join(chunks) == plain, side
    stats = engine.last_stats[chat.SIDE_TUNED]
    assert stats.new_tokens >= 3 and stats.ttft_s is not None and stats.ttft_s < stats.total_s


# Two histories whose prompts differ in length (one side has an earlier exchange), so the
# batch is left-padded: the padded row must still answer exactly as it does alone.
LONG_HISTORY = [
    {"role": "user", "content": "Hi, I ordered a blue kettle last week."},
    {"role": "assistant", "content": "Thanks for your order! How can I help you today?"},
    {"role": "user", "content": TICKET},
]


@pytest.mark.slow
def test_ab_turn_in_one_batched_pass_matches_each_side_alone(engine):
    """Both sides in ONE generate call (the adapter switched per row), streamed together, give
    each side's greedy text alone, with prompts of different lengths (left padding)."""
    settings = chat.GenerationSettings(max_new_tokens=32)
    histories = {chat.SIDE_BASE: LONG_HISTORY, chat.SIDE_TUNED: ticket_messages()}
    alone = {s: engine.generate(s, histories[s], settings, system=SYSTEM) for s in chat.SIDES}
    assert alone[chat.SIDE_BASE] != alone[chat.SIDE_TUNED]
    lengths = {
        s: len(engine.tokenizer(engine.prompt_text(histories[s], SYSTEM))["input_ids"])
        for s in chat.SIDES
    }
    assert lengths[chat.SIDE_BASE] > lengths[chat.SIDE_TUNED] + 10  # really padded

    got = {s: "" for s in chat.SIDES}
    order: list[str] = []
    for side, chunk in engine.compare_stream(histories, settings, system=SYSTEM):
        got[side] += chunk
        order.append(side)
    assert "one batched pass" in engine.last_mode
    assert got == alone
    # both panels stream at once: B's first piece comes before A's last one
    assert order.index(chat.SIDE_TUNED) < len(order) - 1 - order[::-1].index(chat.SIDE_BASE)
    for side in chat.SIDES:
        st = engine.last_stats[side]
        assert st.new_tokens >= 3 and not st.stopped and st.prompt_tokens == lengths[side]

    engine.batch_sides = False  # the fallback: one after the other, with the reason shown
    try:
        again = {s: "" for s in chat.SIDES}
        for side, chunk in engine.compare_stream(histories, settings, system=SYSTEM):
            again[side] += chunk
        assert again == alone and engine.last_mode.startswith("one side after the other")
    finally:
        engine.batch_sides = True


@pytest.mark.slow
def test_bf16_ab_turn_matches_alone_or_splits_at_a_near_tie(run_dir: Path, monkeypatch):
    """Chat in bf16 (this CPU's precision where it has native bf16, as on a GPU): base and
    fine-tune rows batched give each row's answer alone, except that a greedy pick may flip
    where two tokens were within rounding; then the logits must show it (the export check's
    rule: the gap alone <= twice the logit change at the split), and every step up to the
    split must agree to bf16 rounding. The engine's own batched stream is the batch here."""
    import contextlib

    import torch

    from studio.models.batching import adapter_rows, left_pad

    monkeypatch.delenv(precision.CPU_FP32_ENV, raising=False)  # the `engine` fixture's
    if not precision.cpu_bf16()[0]:
        pytest.skip(precision.cpu_bf16()[1])
    # On every core, as the app runs (a test worker has one thread): bf16 rounds differently
    # with one thread (mean change up to 0.53 seen, still far from a wrong-row adapter's 1.6).
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    eng = chat.ChatEngine()
    eng.load(run_dir)
    try:
        model, tok = eng.model, eng.tokenizer
        assert model.dtype == torch.bfloat16
        rows = [(chat.SIDE_BASE, LONG_HISTORY), (chat.SIDE_TUNED, ticket_messages())]
        rows += [(chat.SIDE_TUNED, LONG_HISTORY), (chat.SIDE_BASE, ticket_messages())]
        texts = [eng.prompt_text(m, SYSTEM) for _, m in rows]
        settings = chat.GenerationSettings(max_new_tokens=24)
        streamed = eng.generate_rows([(side, m, SYSTEM) for side, m in rows], settings)
        kw = dict(settings.generate_kwargs(tok), output_logits=True, return_dict_in_generate=True)
        enc = left_pad(tok, texts, model.device)
        enc.pop("lengths")
        with torch.inference_mode(), adapter_rows(model, [s != chat.SIDE_BASE for s, _ in rows]):
            batch = model.generate(**enc, **kw)
        width = enc["input_ids"].shape[1]
        for i, ((side, _), text) in enumerate(zip(rows, texts, strict=True)):
            got = batch.sequences[i, width:].tolist()
            assert streamed[i] == tok.decode(got, skip_special_tokens=True)
            one = tok(text, add_special_tokens=False, return_tensors="pt")
            off = model.disable_adapter() if side == chat.SIDE_BASE else contextlib.nullcontext()
            with torch.inference_mode(), off:
                alone = model.generate(**one, **kw)
            want = alone.sequences[0, one["input_ids"].shape[1] :].tolist()
            split = next(
                (k for k, (a, b) in enumerate(zip(want, got, strict=False)) if a != b), None
            )
            steps = min(len(want), len(got)) if split is None else split + 1
            for k in range(steps):  # padded rows differ by rounding: mean |change| ~0.06-0.25
                ref, mine = alone.logits[k][0].float(), batch.logits[k][i].float()
                change = float((ref - mine).abs().max())  # (an adapter on the wrong row: 1.6-15)
                assert float((ref - mine).abs().mean()) <= 0.5, (side, k, change)
            if split is not None:
                margin = float(ref[want[split]] - ref[got[split]])
                assert margin <= 2 * change, (side, split, margin, change)
    finally:
        eng.unload()
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_repetition_penalty_with_padding_falls_back_with_its_reason(engine):
    settings = chat.GenerationSettings(max_new_tokens=12, repetition_penalty=1.3)
    histories = {chat.SIDE_BASE: LONG_HISTORY, chat.SIDE_TUNED: ticket_messages()}
    alone = {s: engine.generate(s, histories[s], settings) for s in chat.SIDES}
    got = {s: "" for s in chat.SIDES}
    for side, chunk in engine.compare_stream(histories, settings):
        got[side] += chunk
    assert got == alone
    assert "repetition penalty" in engine.last_mode and "after the other" in engine.last_mode


@pytest.mark.slow
def test_both_sides_share_one_model_in_memory(engine, embedded_model):
    """The engine holds one base: everything reachable from it is ~1x a plain base model."""
    from studio.models.loader import load_model_for_inference

    for side in chat.SIDES:  # both sides have generated
        engine.generate(side, ticket_messages(), TINY)
    plain = load_model_for_inference(embedded_model.path)
    plain_bytes = chat.model_bytes(plain)
    held = _reachable_tensor_bytes(engine)
    assert plain_bytes <= held <= 1.1 * plain_bytes, (held, plain_bytes)
    assert engine.tensor_bytes() <= 1.1 * plain_bytes


@pytest.mark.slow
def test_stop_halts_generation_and_both_sides(engine):
    settings = chat.GenerationSettings(max_new_tokens=200)
    msgs = {s: ticket_messages("Write a very long story about a cat.") for s in chat.SIDES}
    got: list[tuple[str, str]] = []
    for side, chunk in engine.compare_stream(msgs, settings):  # one batched pass
        got.append((side, chunk))
        if len(got) == 2:
            engine.stop()
    for side in chat.SIDES:
        stats = engine.last_stats[side]
        assert stats.stopped and stats.new_tokens < 200, side
    engine.batch_sides = False  # one after the other: the second side must not start
    try:
        got.clear()
        for side, chunk in engine.compare_stream(msgs, settings):
            got.append((side, chunk))
            if len(got) == 2:
                engine.stop()
        assert {side for side, _ in got} == {chat.SIDE_BASE}, "the second side must not start"
        assert engine.last_stats[chat.SIDE_BASE].stopped
    finally:
        engine.batch_sides = True
    # the next turn is not affected by the earlier Stop
    assert engine.generate(chat.SIDE_TUNED, ticket_messages(), TINY)


@pytest.mark.slow
def test_batch_compare_on_the_validation_split(engine, run_dir: Path):
    items = evaluate.validation_items(run_dir, limit=2)
    assert len(items) == 2 and all(i.reference for i in items)
    # the split is the one training held out: its rows are absent from nothing but training
    assert json.loads(run_dir.joinpath("training_metadata.json").read_text())["dataset"][
        "val_rows"
    ] >= len(items)
    seen: list[tuple[int, int]] = []
    settings = chat.GenerationSettings(max_new_tokens=24)
    first = evaluate.batch_compare(
        engine, items, settings, progress=lambda d, t, m: seen.append((d, t))
    )
    assert [r["prompt"] for r in first.rows] == [i.prompt for i in items]
    assert seen[0] == (0, 2) and seen[-1] == (2, 2)
    for row, item in zip(first.rows, items, strict=True):
        assert row["base"] != row["fine_tuned"]
        assert row["tuned_rouge_l"] == round(scores.rouge_l(row["fine_tuned"], item.reference), 4)
        # The references are JSON objects; the untuned base answers tickets in prose.
        assert row["base_json_ok"] is False, row["base"]
    assert first.summary["json_references"] == 2
    assert first.csv_path is not None and first.csv_path.parent == run_dir
    assert first.csv_path.name.startswith("compare-") and first.csv_path.suffix == ".csv"
    with first.csv_path.open(encoding="utf-8-sig") as fh:  # Excel's BOM first
        saved = list(csv.DictReader(fh))
    assert [r["fine_tuned"] for r in saved] == [r["fine_tuned"] for r in first.rows]

    second = evaluate.batch_compare(engine, items[:1], TINY)
    assert second.csv_path != first.csv_path and first.csv_path.is_file()


@pytest.mark.slow
def test_batched_compare_matches_one_prompt_at_a_time(engine, run_dir: Path):
    """Both sides of several prompts per generate call (prompts of different lengths, one
    with its own system message) give the same greedy answers as one prompt and one side
    at a time."""
    items = evaluate.validation_items(run_dir, limit=2)
    items += [
        evaluate.BatchItem(ticket_messages("Hello!")),
        evaluate.BatchItem([{"role": "system", "content": SYSTEM}, *LONG_HISTORY], "x"),
    ]
    settings = chat.GenerationSettings(max_new_tokens=20)
    batched = evaluate.batch_compare(
        engine, items, settings, system="Be brief.", prompts_per_call=3
    )
    assert "batched pass" in engine.last_mode
    assert [r["prompt"] for r in batched.rows] == [i.prompt for i in items]
    for row, item in zip(batched.rows, items, strict=True):
        for side, key in ((chat.SIDE_BASE, "base"), (chat.SIDE_TUNED, "fine_tuned")):
            sys_prompt = None if item.messages[0]["role"] == "system" else "Be brief."
            alone = engine.generate(side, item.messages, settings, system=sys_prompt).strip()
            assert row[key] == alone, (item.prompt, side)


@pytest.mark.slow
def test_bench_batching_ratios_at_a_tiny_size(engine):
    """`python -m studio.bench chat`'s batching figures, at a tiny size (no timing checked)."""
    out = measure.batching_ratios(engine, ["Hello!"], ["Hi", "Thanks!", "Bye"], 4, 4, reps=2)
    lines = measure.batching_lines(out)
    assert out["repetitions"] == 2 and len(lines) == 5
    for key in ("ab_turn", "ab_turn_natural_length", "batch_compare"):
        low, high = out[key]["ratio_spread"]
        assert 0 < low <= out[key]["ratio_median"] <= high
    assert "both sides 4 new tokens" in lines[0] and "natural lengths" in lines[1]
    assert "3 prompts x 2 sides" in lines[2]
    assert "one after the other (fp32 on this CPU" in lines[3]  # this engine runs fp32
    assert engine.batch_sides is True  # the bench leaves the engine's choice as it was
    # its fixed-length turn: both sides generate exactly the asked tokens, past an answer's end
    fixed = chat.GenerationSettings(max_new_tokens=40, min_new_tokens=40)
    for _ in engine.compare_stream(
        {s: [{"role": "user", "content": "Hi"}] for s in chat.SIDES}, fixed
    ):
        pass
    assert [engine.last_stats[s].new_tokens for s in chat.SIDES] == [40, 40]


@pytest.mark.slow
def test_four_bit_base_template_warning_and_unload(run_dir: Path, tmp_path: Path):
    """4-bit (QLoRA-style) loading works on CPU; a changed template is flagged; Unload frees."""
    import shutil

    copy = tmp_path / "run-copy"
    shutil.copytree(run_dir / "adapter", copy / "adapter")
    meta = json.loads((run_dir / "training_metadata.json").read_text("utf-8"))
    meta["template_hash"] = "0000000000000000"
    (copy / "training_metadata.json").write_text(json.dumps(meta), "utf-8")

    eng = chat.ChatEngine()
    info = eng.load(copy, precision=chat.PRECISION_4)
    assert info.precision == "4-bit"
    assert any("Linear4bit" in type(m).__name__ for m in eng.model.modules())
    assert any("template" in w.lower() for w in info.warnings)
    assert eng.generate(chat.SIDE_BASE, ticket_messages(), TINY)
    ref = weakref.ref(eng.model)
    eng.unload()
    gc.collect()
    assert ref() is None and not eng.loaded
    with pytest.raises(chat.ChatError, match="No model loaded"):
        eng.generate(chat.SIDE_BASE, ticket_messages())


@pytest.mark.slow
def test_concurrent_turns_do_not_mix_sides(engine):
    """Two turns at once (two browser tabs) are serialized: each side keeps its own answer."""
    msgs = ticket_messages()
    short = chat.GenerationSettings(max_new_tokens=12)
    want = {s: engine.generate(s, msgs, short, system=SYSTEM) for s in chat.SIDES}
    got: dict[str, str] = {}

    def run(side: str) -> None:
        got[side] = engine.generate(side, msgs, short, system=SYSTEM)

    threads = [threading.Thread(target=run, args=(s,)) for s in chat.SIDES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


@pytest.mark.slow
def test_bench_chat_reports_memory_and_speed(run_dir: Path):
    result = measure.bench_chat(
        None, run_dir, ["Hello!"], max_new_tokens=4, ab_tokens=4, batch_prompts=["Hi"], reps=1
    )
    assert result["batching"]["ab_turn"]["ratio_median"] > 0
    mem = result["memory"]
    assert mem["base_alone_weights_mb"] > 0 and mem["rss_ratio"] > 0
    assert mem["weights_ratio"] <= 1.1  # one base in memory, plus a small adapter
    for side in ("base", "fine-tuned"):
        assert result[side]["new_tokens"] > 0 and result[side]["ttft_s"] > 0


def test_stop_criterion_answers_on_the_inputs_device() -> None:
    """transformers ORs the criterion's result with a tensor on input_ids' device: a CPU
    tensor there breaks every CUDA generation. `meta` stands in for a GPU here."""
    import threading

    import torch

    from studio.chat.streaming import stop_criteria

    event = threading.Event()
    (criterion,) = stop_criteria(event)
    ids = torch.zeros((2, 5), dtype=torch.long, device="meta")
    out = criterion(ids, None)
    assert out.device == ids.device and out.shape == (2,) and out.dtype == torch.bool


@pytest.mark.slow
def test_base_alone_then_a_run_attaches_to_the_model_in_memory(run_dir: Path, tmp_path: Path):
    """A user sees the baseline first; picking a run then attaches its adapter to the very
    base already loaded (no second load), runs swap adapters, and another precision reloads."""
    import shutil

    eng = chat.ChatEngine()
    try:
        info = eng.load_base_only()  # the default model, resolved by studio.models.loader
        assert not info.has_adapter and not eng.has_adapter
        assert "no fine-tune loaded" in info.summary()
        base = eng.model
        alone = eng.generate(chat.SIDE_BASE, ticket_messages(), GREEDY, system=SYSTEM)
        with pytest.raises(chat.ChatError, match="No fine-tune loaded"):
            eng.generate(chat.SIDE_TUNED, ticket_messages(), TINY)

        info = eng.load(run_dir)
        assert info.reused_base and eng.base_loads == 1
        assert eng.model.get_base_model() is base
        assert eng.generate(chat.SIDE_BASE, ticket_messages(), GREEDY, system=SYSTEM) == alone
        tuned = eng.generate(chat.SIDE_TUNED, ticket_messages(), GREEDY, system=SYSTEM)
        assert tuned != alone

        other = tmp_path / "other-adapter"  # a second adapter on the same base swaps in
        shutil.copytree(run_dir / "adapter", other)
        assert eng.load(other).reused_base and eng.base_loads == 1
        assert eng.generate(chat.SIDE_TUNED, ticket_messages(), GREEDY, system=SYSTEM) == tuned

        eng.load_base_only()  # back to A only: the adapter comes off, the base stays
        assert eng.model is base and eng.base_loads == 1 and not eng.has_adapter
        assert eng.generate(chat.SIDE_BASE, ticket_messages(), GREEDY, system=SYSTEM) == alone

        info = eng.load(run_dir, precision=chat.PRECISION_4)  # not the same base: reload
        assert not info.reused_base and eng.base_loads == 2 and info.precision == "4-bit"
    finally:
        eng.unload()


@pytest.mark.slow
def test_batch_compare_holds_its_model_and_saves_to_its_run(engine, run_dir: Path):
    """Load or Unload during a batch is refused; training taking the GPU stops the batch,
    and the finished rows' CSV still goes to the run the batch started with."""
    items = evaluate.validation_items(run_dir, limit=3)
    refusals: list[str] = []
    freed: list[str | None] = []

    def on_row(row: dict) -> None:
        if not refusals:
            for attempt in (eng_load_base, lambda: engine.load(run_dir), engine.unload):
                with pytest.raises(chat.ChatError, match="batch compare is running") as exc:
                    attempt()
                refusals.append(str(exc.value))
            assert gpu.release_for_training("cpu") is None  # on CPU the chat model stays
            assert engine.loaded
        else:
            freed.append(gpu.release_for_training("cuda", "next-run"))

    def eng_load_base() -> None:
        engine.load_base_only()

    try:
        result = evaluate.batch_compare(engine, items, TINY, on_row=on_row, prompts_per_call=2)
        assert len(refusals) == 3
        assert freed and "Unloaded the Chat model" in (freed[0] or "")
        assert not engine.loaded
        assert len(result.rows) == 2 and result.stopped
        assert "next-run" in (result.error or "")
        assert result.csv_path is not None and result.csv_path.parent == run_dir
        with result.csv_path.open(encoding="utf-8") as fh:
            assert len(list(csv.DictReader(fh))) == 2
    finally:
        if not engine.loaded:  # the module's shared engine, for the tests after this one
            engine.load(run_dir)
