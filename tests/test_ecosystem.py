"""What a fine-tune meets outside the studio: Ollama, k-quants, TensorBoard, metrics, the hub.

- The Modelfile's TEMPLATE is executed as a Go template (studio.export.gotemplate) and must
  give the exact prompt the model's own Jinja chat template gives, for the real templates of
  Qwen2.5, Qwen3, Llama 3.x and Gemma 2 (read from llama.cpp's templates folder, as
  tests/test_templates.py does).
- k-quant export routes, metric scores against the libraries' documented examples, the
  Hugging Face dataset route through a local dataset folder, TensorBoard event files.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from studio.data import chat_format
from studio.export import gguf, gotemplate, ollama
from tests.test_templates import MARKERS, templates_dir  # noqa: F401  (fixture)

# Template file -> (family, system mode) the export must find in it.
OLLAMA_FAMILIES = {
    "Qwen-Qwen2.5-7B-Instruct": ("chatml", "turn"),
    "Qwen-Qwen3-0.6B": ("chatml", "turn"),
    "meta-llama-Llama-3.1-8B-Instruct": ("llama3", "turn"),
    "meta-llama-Llama-3.2-3B-Instruct": ("llama3", "turn"),
    "meta-llama-Llama-3.3-70B-Instruct": ("llama3", "turn"),
    # Gemma 2's template raises on a system role; training (chat_format.render) puts the
    # system text at the top of the first user turn, and so must Ollama.
    "google-gemma-2-2b-it": ("gemma", "first_user"),
}
SYS = {"role": "system", "content": "Trả lời bằng JSON.\nNgắn gọn."}
CHATS = [
    [{"role": "user", "content": "Xin chào"}],
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": '{"answer": 4}'},
        {"role": "user", "content": "สวัสดีครับ {{ not a Go action }}"},
    ],
    [SYS, {"role": "user", "content": "Hi"}],
    [
        SYS,
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"},
    ],
]


@pytest.fixture(scope="module")
def family_tok(tokenizer, templates_dir: Path):  # noqa: F811
    """A copy of the embedded tokenizer wearing one family's real chat template."""
    made: dict[str, Any] = {}

    def make(family: str) -> Any:
        if family not in made:
            tok = copy.deepcopy(tokenizer)
            tok.chat_template = (templates_dir / f"{family}.jinja").read_text(encoding="utf-8")
            tok.add_tokens([MARKERS[family]], special_tokens=True)
            made[family] = tok
        return made[family]

    return make


@pytest.mark.parametrize("family", list(OLLAMA_FAMILIES))
def test_modelfile_template_renders_like_the_jinja_template(family_tok, family: str) -> None:
    tok = family_tok(family)
    fmt = ollama.derive_chat_format(tok)
    assert (fmt.family, fmt.system_mode) == OLLAMA_FAMILIES[family]
    assert fmt.exact, fmt.problems
    template = ollama.ollama_template(fmt)
    checked = 0
    for chat in CHATS:
        if fmt.system_mode == "none" and chat[0]["role"] == "system":
            continue
        want = chat_format.render(tok, chat, add_generation_prompt=True).removeprefix(fmt.bos)
        # The TEMPLATE string itself, run as Go runs it on what Ollama passes.
        got = gotemplate.render(template, gotemplate.ollama_data(chat, fmt.default_system))
        assert got == want
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize("family", list(OLLAMA_FAMILIES))
def test_modelfile_stops_at_the_models_end_of_turn_marker(family_tok, family: str) -> None:
    tok = family_tok(family)
    fmt = ollama.derive_chat_format(tok)
    stops = ollama.stop_tokens(fmt, tok)
    assert stops[0] == MARKERS[family] == chat_format.end_of_turn_marker(tok)
    text = ollama.build_modelfile(
        from_path="./x-f16.gguf",
        fmt=fmt,
        stops=stops,
        system="Trả lời bằng JSON.",
        system_note="the system prompt shared by all training rows.",
        params={"temperature": 0.2},
        params_source="test",
        header=["test"],
    )
    assert f'PARAMETER stop "{MARKERS[family]}"' in text
    if fmt.system_mode != "none":
        assert 'SYSTEM """Trả lời bằng JSON."""' in text
    # The TEMPLATE in the file is the one checked above.
    assert f'TEMPLATE """{ollama.ollama_template(fmt)}"""' in text


def test_go_renderer_follows_go_semantics() -> None:
    """Pieces of Go's text/template the TEMPLATE uses, with results known from Go's docs."""
    data = {"System": "", "Messages": [{"Role": "user", "Content": "a"}], "N": 3}
    assert gotemplate.render('{{ "{{" }}x', data) == "{{x"
    assert gotemplate.render("{{ if .System }}S{{ else }}none{{ end }}", data) == "none"
    assert gotemplate.render("{{ $s := 1 }}{{ if true }}{{ $s = 2 }}{{ end }}{{ $s }}", data) == "2"
    loop = "{{ range $i, $m := .Messages }}{{ $i }}:{{ .Content }}{{ len (slice $.Messages $i) }}"
    assert gotemplate.render(loop + "{{ end }}", data) == "0:a1"
    assert gotemplate.render("{{ if and .N (ne .N 2) }}y{{ end }}", data) == "y"
    assert gotemplate.render("a  {{- .N -}}  b", data) == "a3b"
    with pytest.raises(gotemplate.GoTemplateError):
        gotemplate.render("{{ if .N }}open", data)
    with pytest.raises(gotemplate.GoTemplateError):
        gotemplate.render("{{ printf .N }}", data)


def test_ollama_data_puts_the_modelfile_system_first_only_when_the_chat_has_none() -> None:
    chat = [{"role": "user", "content": "Hi"}]
    assert gotemplate.ollama_data(chat, "S")["System"] == "S"
    own = [{"role": "system", "content": "mine"}, *chat]
    data = gotemplate.ollama_data(own, "S")
    assert data["System"] == "mine"
    assert [m["Role"] for m in data["Messages"]] == ["system", "user"]


# --------------------------------------------------------------------------- k-quants


def test_gguf_types_offer_k_quants_and_normalize_their_spelling() -> None:
    assert {"q4_K_M", "q5_K_M", "q6_K"} <= set(gguf.GGUF_TYPES)
    assert gguf.normalize_gguf_type("Q4_K_M") == "q4_K_M"
    assert gguf.normalize_gguf_type("F16") == "f16"
    with pytest.raises(gguf.ExportError):
        gguf.normalize_gguf_type("q3_K_S")
    assert gguf.converter_type("q4_K_M") == "f16"
    assert gguf.converter_type("q8_0") == "q8_0"


def test_without_llama_cpps_quantizer_the_ollama_route_is_written(tmp_path: Path) -> None:
    f16 = tmp_path / "run-f16.gguf"
    f16.write_bytes(b"GGUF")
    found = gguf.local_quantizer()
    if not isinstance(found, str):
        pytest.skip("llama.cpp's quantizer loads on this machine: the local route applies")
    assert gguf.quantize_gguf(f16, "q4_K_M") == found  # the reason, no file
    assert gguf.quantize_route("q4_K_M", f16) == "q4_K_M"
    assert gguf.quantize_route("q4_K_M", tmp_path / "run-q4_K_M.gguf") is None
    assert gguf.quantize_route("f16", f16) is None
    note = gguf.route_note("q4_K_M", f16, found)
    assert "ollama create --quantize q4_K_M" in note and "NOT" in note
    cmd = ollama.create_command("run", "./Modelfile", gguf.quantize_route("q4_K_M", f16))
    assert cmd == "ollama create run --quantize q4_K_M -f ./Modelfile"


# --------------------------------------------------------------------------- metrics

# sacrebleu's README example: three system sentences against two reference streams.
SACREBLEU_REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]
SACREBLEU_SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]


def test_bleu_and_chrf_are_sacrebleus_documented_scores() -> None:
    from studio.data import scores

    _, bleu, chrf = scores._scorers()  # the scorers batch compare uses, as configured
    assert round(bleu.corpus_score(SACREBLEU_SYS, SACREBLEU_REFS).score, 2) == 48.53
    assert round(chrf.corpus_score(SACREBLEU_SYS, SACREBLEU_REFS).score, 2) == 59.73
    assert scores.bleu("The dog bit the man.", "The dog bit the man.") == pytest.approx(100)
    assert scores.chrf("The dog bit the man.", "The dog bit the man.") == pytest.approx(100)
    assert scores.bleu("cat", "The dog bit the man.") == 0.0


def test_rouge_l_is_rouge_scores_and_keeps_vietnamese_and_thai() -> None:
    from rouge_score import tokenize

    from studio.data import scores

    # rouge-score's README pair: LCS "the quick brown jumps the" = 5 of 8 and 9 tokens.
    got = scores.rouge_l(
        "The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog"
    )
    assert got == pytest.approx(2 * (5 / 8) * (5 / 9) / (5 / 8 + 5 / 9))
    # Why the custom tokenizer: the default one drops Thai entirely and splits Vietnamese
    # words at every accented letter.
    assert tokenize.tokenize("สวัสดีครับ", None) == []
    assert tokenize.tokenize("Xin chào", None) == ["xin", "ch", "o"]
    assert scores.rouge_l("Xin chào bạn", "Xin chào anh") == pytest.approx(2 / 3)
    thai = scores.rouge_l("สวัสดีครับ", "สวัสดีค่ะ")
    assert 0.5 < thai < 1.0  # shared characters count, different endings do not
    assert 0 < scores.chrf("สวัสดีครับ", "สวัสดีค่ะ") < 100


def test_score_rows_carry_bleu_chrf_rouge_next_to_exact_match_and_json() -> None:
    from studio.chat import evaluate
    from studio.data import scores

    ref = '{"category": "shipping", "reply": "Xin lỗi"}'
    row = scores.score('{"category": "shipping", "reply": "Xin lỗi bạn"}', ref)
    assert list(row) == ["exact_match", "bleu", "chrf", "rouge_l", "json_ok"]
    assert row["exact_match"] is False and row["json_ok"] is True
    assert 0 < row["bleu"] < 100 and 0 < row["chrf"] < 100 and 0 < row["rouge_l"] < 1
    rows = [{f"tuned_{k}": v for k, v in row.items()}, {f"tuned_{k}": v for k, v in row.items()}]
    summary = evaluate.summarize(rows)
    assert summary["tuned_bleu"] == row["bleu"] and summary["tuned_chrf"] == row["chrf"]
    assert {"base_bleu", "tuned_chrf"} <= set(evaluate.CSV_COLUMNS)


# --------------------------------------------------------------------------- hub datasets


def test_an_unreachable_hub_says_so_and_points_to_the_local_file_route(monkeypatch) -> None:
    import socket

    from studio.data import hub

    with socket.socket() as s:  # a port nothing listens on: a real refused connection
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(hub.DatasetError) as err:
        hub.fetch_dataset("tatsu-lab/alpaca", "train")
    text = str(err.value)
    assert "cannot be reached" in text and "127.0.0.1" in text
    assert "local-file route" in text and "to_json('train.jsonl')" in text


def test_column_map_parsing_names_the_bad_entry() -> None:
    from studio.data import hub

    assert hub.parse_column_map("instruction=question, output = answer") == {
        "instruction": "question",
        "output": "answer",
    }
    assert hub.parse_column_map("") == {}
    with pytest.raises(hub.DatasetError, match="field=column"):
        hub.parse_column_map("instruction")
    with pytest.raises(hub.DatasetError, match="not a field"):
        hub.parse_column_map("question=instruction")


def test_a_dataset_by_name_is_validated_and_pii_scanned_like_a_file(
    studio_home: Path, tmp_path: Path
) -> None:
    """A local dataset folder, read by datasets.load_dataset as it reads a hub repo."""
    from studio.data import hub
    from studio.data import scan as ds_scan

    folder = tmp_path / "support-vi"
    (folder / "data").mkdir(parents=True)
    rows = [
        {"question": f"Đơn hàng {i} chưa tới?", "answer": f"Chúng tôi sẽ kiểm tra đơn {i}."}
        for i in range(6)
    ]
    rows[2]["answer"] = "Gọi cho tôi: 0912 345 678"  # a phone number the PII scan must find
    rows[4]["question"] = ""  # an empty instruction: a row validation must reject
    with (folder / "data" / "train.jsonl").open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with pytest.raises(hub.DatasetError, match="no column 'reply'"):
        hub.fetch_dataset(str(folder), "train", {"output": "reply"})
    with pytest.raises(hub.DatasetError, match="test"):
        hub.fetch_dataset(str(folder), "test")  # a split the folder does not have
    path = hub.fetch_dataset(str(folder), "train", {"instruction": "question", "output": "answer"})
    assert path.parent == studio_home / "datasets" / hub.HUB_DIR
    ins = ds_scan.inspect_file(path)
    assert ins.report.format == "alpaca"
    assert len(ins.report.rows) == 5 and len(ins.report.errors) == 1
    assert ins.report.rows[0]["messages"][0]["content"] == "Đơn hàng 0 chưa tới?"
    assert ins.scan is not None and ins.scan.counts and len(ins.scan.rows_with_pii) == 1


# --------------------------------------------------------------------------- tracking


def test_wandb_is_used_only_when_set_up_and_asked_for(monkeypatch) -> None:
    import importlib.util

    from studio.train import tracking

    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    assert tracking.report_to(False) == ["tensorboard"]  # not asked for: never
    if importlib.util.find_spec("wandb") is None:  # asked for, key set, package missing
        assert tracking.report_to(True) == ["tensorboard"]
        assert "pip install wandb" in tracking.tracking_note(True)
    else:
        assert tracking.report_to(True) == ["tensorboard", "wandb"]


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def two_step_run(studio_home: Path, embedded_model) -> Path:
    """A real 2-step run of studio.train (the same path as the Train tab)."""
    from studio.config import RunConfig
    from studio.train.jobs import run_training

    cfg = RunConfig(
        run_name="ecosystem",
        max_steps=2,
        max_seq_len=96,
        batch_size=2,
        val_fraction=0.0,
        eval_steps=1000,
        save_steps=1000,
        device="cpu",
        allow_pii=True,  # the bundled sample has planted fake PII
        wandb=True,  # asked for, but not set up here: must be skipped, never fail the run
    )
    result = run_training(cfg)
    assert result.status == "completed", result.message
    return Path(result.run_dir)


@pytest.mark.slow
def test_every_run_writes_tensorboard_event_files_into_its_folder(two_step_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from studio.train import tracking

    folder = two_step_run / tracking.TENSORBOARD_DIR
    assert list(folder.glob("events.out.tfevents.*")), list(two_step_run.rglob("*tfevents*"))
    acc = EventAccumulator(str(folder))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert all(e.value > 0 for e in loss)
    assert "train/learning_rate" in acc.Tags()["scalars"]


@pytest.mark.slow
@pytest.mark.browser
def test_export_section_q4_k_m_says_which_route_makes_the_file(
    two_step_run: Path, start_app, page
) -> None:
    """Export in the browser with q4_K_M picked. Without llama.cpp's quantizer (this machine:
    its wheel needs glibc 2.38) the section says so, keeps the checked f16 GGUF, and prints
    the `ollama create --quantize q4_K_M` command that makes the q4_K_M model; the Modelfile
    says the same, and stops at the model's end-of-turn marker."""
    import re

    from playwright.sync_api import expect

    found = gguf.local_quantizer()
    app = start_app()
    page.goto(app.url)
    page.get_by_role("tab", name="Chat").click()
    page.get_by_text("Export", exact=True).first.click()  # the accordion's label, not its button
    expect(page.locator("#export-button")).to_be_visible()
    page.get_by_label("Run to export").click()
    page.get_by_role("option", name=two_step_run.name, exact=False).click()
    expect(page.locator("#export-run-details")).to_contain_text(str(two_step_run))
    choice = page.locator("#export-gguf label").filter(has_text="GGUF q4_K_M")
    choice.click()
    expect(choice.locator("input")).to_be_checked()
    page.locator("#export-button").click()
    status = page.locator("#export-status")
    expect(status).to_contain_text("Exported", timeout=900_000)
    commands = page.locator("#export-commands")
    files = page.locator("#export-files")
    if isinstance(found, str):  # the Ollama route: the f16 file here, Ollama quantizes it
        expect(status).to_contain_text("GGUF route: No q4_K_M file was written here")
        expect(status).to_contain_text(found.split(":")[0])  # why llama.cpp's quantizer is out
        expect(status).to_contain_text("ollama create --quantize q4_K_M")
        expect(status).to_contain_text("NOT checked")
        expect(commands).to_contain_text(re.compile(r"ollama create \S+ --quantize q4_K_M -f "))
        expect(files).to_contain_text("-f16.gguf")
        expect(files).not_to_contain_text("q4_K_M.gguf")
        f16 = sorted(two_step_run.glob("export*/*-f16.gguf"))
        assert f16 and f16[-1].stat().st_size > 100e6  # 135M parameters at 2 bytes each
        expect(status).to_contain_text("✅ GGUF file (loaded back) vs merged folder")
    else:  # llama.cpp's quantizer loaded: the q4_K_M file is written here
        expect(status).to_contain_text("llama_model_quantize")
        expect(files).to_contain_text("-q4_K_M.gguf")
        expect(commands).not_to_contain_text("--quantize")
    (modelfile,) = (p for p in two_step_run.glob("export*/Modelfile") if p.is_file())
    text = modelfile.read_text(encoding="utf-8")
    assert 'PARAMETER stop "<|im_end|>"' in text
    if isinstance(found, str):
        assert "--quantize q4_K_M -f Modelfile" in text and "-f16.gguf" in text
    assert "Traceback" not in page.content()
