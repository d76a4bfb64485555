"""One reader for a finished run, one generation home: Chat, Export and the training checks
read a run, pick its tokenizer, rebuild its validation split and stop an answer the same way.

Each test builds the case where the old copies disagreed: a run whose saved tokenizer is not
the base's, a dataset changed since training, a template whose end-of-turn marker is not EOS.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from studio import chat, runs
from studio.config import RunConfig
from studio.data.load import SAMPLE_DATASET
from studio.export import run as export

# A ChatML-like template whose turns end with <|endoftext|> (id 0), not the tokenizer's EOS
# <|im_end|> (id 2): the case where "template marker", "EOS" and "generation EOS" disagree.
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are {{ WHO }}.<|endoftext|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|endoftext|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BASE_WHO, RUN_WHO = "BaseBot", "Zed the support desk"
QUESTION = [{"role": "user", "content": "Tôi chưa nhận được đơn hàng."}]


def _template(who: str) -> str:
    return TEMPLATE.replace("{{ WHO }}", who)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_folder(root: Path, name: str, meta: dict, settings: dict | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    meta = {"status": "completed", "created": name[-15:], **meta}
    if settings is not None:
        meta["settings"] = settings
    runs.write_metadata(run, meta)
    return run


def _adapter(folder: Path, base: str, weights: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / runs.ADAPTER_CONFIG).write_text(
        json.dumps({"base_model_name_or_path": base}), encoding="utf-8"
    )
    if weights:
        (folder / "adapter_model.safetensors").write_bytes(b"w")
    return folder


# --------------------------------------------------------------------------- the reader


def test_one_reader_lists_and_reads_runs_for_every_tab(tmp_path: Path):
    """Train's list, Chat's picker and Export's picker are filters of one listing; a run's
    base comes from what training recorded, else run.yaml, else the adapter's config."""
    root = tmp_path / "runs"
    done = _run_folder(
        root,
        "done-20250102-000000",
        {"base_model": {"name": "org/base", "path": str(tmp_path / "base-folder")}},
        {"method": "qlora", "trust_remote_code": True},
    )
    _adapter(done / runs.ADAPTER, "something/else")
    no_weights = _run_folder(root, "noweights-20250103-000000", {}, {"base_model": "org/b2"})
    _adapter(no_weights / runs.ADAPTER, "org/b2", weights=False)
    ckpt_only = root / "ckpt-20250104-000000"
    ckpt_only.mkdir(parents=True)
    cfg = RunConfig(run_name="ckpt", base_model="org/from-yaml", method="lora")
    runs.atomic_write_text(ckpt_only / runs.RUN_YAML, cfg.to_yaml())
    ckpt = _adapter(ckpt_only / runs.CHECKPOINTS / "checkpoint-3", "org/from-yaml")
    (ckpt / "trainer_state.json").write_text("{}", encoding="utf-8")
    bare = _run_folder(root, "bare-20250105-000000", {})
    _adapter(bare / runs.ADAPTER, "org/only-in-adapter-config")
    (root / "not-a-run").mkdir()

    every = [r.name for r in runs.list_runs(root)]
    # newest first; a run with no metadata has no start time and comes last
    assert every == [bare.name, no_weights.name, done.name, ckpt_only.name]
    assert [r.name for r in runs.list_runs(root, with_adapter=True)] == [bare.name, done.name]
    chattable = [r.name for r in runs.list_runs(root, chattable=True)]
    assert chattable == every

    run = runs.open_run(done)
    assert (run.base_model, run.base_model_path) == ("org/base", str(tmp_path / "base-folder"))
    assert (run.method, run.trust_remote_code, run.has_adapter) == ("qlora", True, True)
    assert runs.open_run(ckpt_only).base_model == "org/from-yaml"
    assert runs.open_run(ckpt_only).adapter_checkpoints == [ckpt]
    assert runs.open_run(bare).base_model == "org/only-in-adapter-config"
    with pytest.raises(runs.RunError, match="not a run folder"):
        runs.open_run(root / "not-a-run")

    # Chat and Export read the very same run (no view of their own)
    source = chat.resolve_adapter(done)
    assert source.run == run and source.base_model == "org/base"
    assert chat.resolve_adapter(ckpt).label == f"{ckpt_only.name}/checkpoints/checkpoint-3"
    assert export.inspect_run(done) == run
    with pytest.raises(export.ExportError, match="no weights"):
        export.inspect_run(no_weights)


def test_a_changed_dataset_is_refused_by_chat_and_named_by_export(tmp_path: Path):
    """The validation split is rebuilt once, the way training split the rows; a file changed
    since training is refused (Chat) or said so (Export), never silently re-split."""
    from studio.train.prepare import load_training_rows, split_rows

    data = tmp_path / "tickets.jsonl"
    shutil.copy(SAMPLE_DATASET, data)
    cfg = RunConfig(run_name="split", dataset_path=str(data), val_fraction=0.2, seed=7)
    meta = {"dataset": {"path": str(data), "format": "auto", "sha256": _sha256(data)}}
    run = _run_folder(tmp_path / "runs", "split-20250101-000000", meta, cfg.to_dict())
    _adapter(run / runs.ADAPTER, "org/base")

    train_rows, val_rows = split_rows(load_training_rows(cfg), cfg.val_fraction, cfg.seed)
    items = chat.validation_items(run)
    assert [[*i.messages, {"role": "assistant", "content": i.reference}] for i in items] == [
        r["messages"] for r in val_rows
    ]
    rows, val, missing = export._training_rows(runs.open_run(run))
    assert missing is None and val == val_rows and len(rows) == len(train_rows) + len(val_rows)

    lines = data.read_text(encoding="utf-8").split("\n")
    data.write_text("\n".join(reversed(lines)), encoding="utf-8")  # same rows, other order
    with pytest.raises(chat.ChatError, match="changed since split-20250101-000000"):
        chat.validation_items(run)
    rows, val, missing = export._training_rows(runs.open_run(run))
    assert (rows, val) == ([], []) and "changed since" in (missing or "")


def test_prompt_records_follow_the_dataset_role_rules(tmp_path: Path):
    """Batch compare reads a record with the dataset's own normalize_record: what a training
    row may hold, a prompt row may hold, and a bad role is refused with its field."""
    from studio.chat.evaluate import item_from_record

    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    item = item_from_record(sharegpt, "line 1")
    assert (item.messages, item.reference) == ([{"role": "user", "content": "Hi"}], "Yo")
    alpaca = item_from_record({"instruction": "Dịch", "input": "xin chào"}, "line 2")
    assert alpaca.messages == [{"role": "user", "content": "Dịch\n\nxin chào"}]
    assert alpaca.reference is None
    with pytest.raises(chat.ChatError, match=r"line 3: messages\[0\].role: unknown role"):
        item_from_record({"messages": [{"role": "gpt", "content": "x"}]}, "line 3")
    prompt = item_from_record({"prompt": "Q", "output": "A"}, "line 4")
    assert (prompt.messages, prompt.reference) == ([{"role": "user", "content": "Q"}], "A")


# --------------------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def marker_run(tmp_path_factory: pytest.TempPathFactory, embedded_model) -> Path:
    """A run on a tiny random Llama whose final norm is zero, so every logit ties and greedy
    picks token 0 (<|endoftext|>, the template's end-of-turn marker) at once. The base folder's
    template says BASE_WHO; the run saved its own tokenizer, whose template says RUN_WHO."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from studio.models import tiny
    from studio.models.loader import load_tokenizer

    root = tmp_path_factory.mktemp("marker")
    base = tiny.build_model("llama", root / "base", dtype="float32")
    tok = load_tokenizer(base)
    tok.chat_template = _template(BASE_WHO)
    tok.save_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(str(base))

    run = _run_folder(
        root / "runs",
        "marker-20250101-000000",
        {"base_model": {"name": str(base), "path": str(base)}},  # an older run: no template hash
        {"method": "lora"},
    )
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(str(run / runs.ADAPTER))
    tok.chat_template = _template(RUN_WHO)
    tok.save_pretrained(str(run / runs.ADAPTER))
    return run


@pytest.mark.slow
def test_chat_export_and_checks_serve_the_runs_tokenizer_and_stop_at_the_marker(
    marker_run: Path,
):
    """Chat used the base folder's tokenizer and stopped at the generation EOS only; Export
    used the run's saved tokenizer and stopped likewise; the checks stopped at the marker.
    Now all three render with the run's tokenizer and stop at the same token."""
    from studio.export import ollama
    from studio.export.merge import merge_adapter
    from studio.models import loader as models
    from studio.models.generate import stop_ids
    from studio.train.checks import sample_answers

    run = runs.open_run(marker_run)
    eng = chat.ChatEngine()
    eng.batch_sides = True  # the batched pass too, though fp32 on a CPU would pick A then B
    eng.load(marker_run, device="cpu")
    try:
        assert f"You are {RUN_WHO}." in eng.prompt_text(QUESTION)
        assert not eng.info.warnings
        tok, model = eng.tokenizer, eng.model
        assert stop_ids(tok, model) == [0, 2]  # marker <|endoftext|>, EOS <|im_end|>
        settings = chat.GenerationSettings(max_new_tokens=6)
        eng.generate(chat.SIDE_TUNED, QUESTION, settings)
        assert (eng.last_stats["tuned"].new_tokens, eng.last_stats["tuned"].hit_limit) == (1, False)
        rows = [(chat.SIDE_BASE, QUESTION, None), (chat.SIDE_TUNED, QUESTION, None)]
        eng.generate_rows(rows, settings)
        assert eng.last_mode == "A and B in one batched pass"
        assert [eng.last_stats[s].new_tokens for s in chat.SIDES] == [1, 1]

        items = [{"messages": QUESTION, "reference": "ok", "fits": True}]
        (sample,) = sample_answers(model, tok, items, limit=6)
        assert (sample["tuned"], sample["tuned_stopped"]) == ("", True)
        assert sample["base_stopped"] is True
    finally:
        eng.unload()

    base = models.resolve_run_base(run)
    assert base.path == Path(run.base_model_path)
    out = marker_run.parent / "merged"
    out.mkdir()
    check, _saved, tok, prompt_ids, (answers, _logits) = merge_adapter(
        run, base, out, [QUESTION], lambda _m, _f: None, max_new_tokens=6
    )
    assert f"You are {RUN_WHO}." in tok.decode(prompt_ids[0])
    assert answers == [[0]] and check.passed  # one token: the marker, as in Chat and the checks
    fmt = ollama.derive_chat_format(tok)
    assert ollama.stop_tokens(fmt, tok, [2]) == ["<|endoftext|>", "<|im_end|>"]  # the Modelfile
