"""Training engine tests: real short LoRA/QLoRA runs of the embedded SmolLM2 on CPU.

Each run is a few steps on ~32 short synthetic support tickets (max length 128), so the file
stays within a few minutes on 2 cores. Failures are injected the way they happen for real: an
out-of-memory error raised from the model's forward at step 2, a checkpoint file that lands
on /dev/full (ENOSPC), a SIGKILL of the CLI process.
"""

from __future__ import annotations

import ast
import gc
import hashlib
import json
import os
import weakref
from pathlib import Path

import pytest

from studio import runs
from studio.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]

TICKETS = [
    ("I was charged twice for order {n}.", "billing", "high"),
    ("How do I reset my password? My username is shopper{n}.", "account", "medium"),
    ("Package {n} is late, where is it?", "shipping", "medium"),
    ("Tôi bị trừ tiền hai lần cho đơn hàng {n}.", "billing", "high"),
]
PROMPT = "I was charged twice for order 4242."


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 short chat rows whose replies follow one JSON pattern (quick to learn)."""
    path = tmp_path_factory.mktemp("train-data") / "tickets.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for i in range(32):
            text, category, priority = TICKETS[i % len(TICKETS)]
            reply = json.dumps({"category": category, "priority": priority})
            row = {
                "messages": [
                    {"role": "user", "content": text.format(n=100 + i)},
                    {"role": "assistant", "content": reply},
                ]
            }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def tiny_cfg(rows: Path, **changes) -> RunConfig:
    base = RunConfig(
        run_name="t",
        dataset_path=str(rows),
        max_seq_len=128,
        batch_size=4,
        learning_rate=2e-3,
        warmup_ratio=0.0,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules="attention",
        max_steps=8,
        val_fraction=0.125,
        eval_steps=4,
        save_steps=4,
        allow_pii=True,
        seed=0,
    )
    return base.replace(**changes)


def train_losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in runs.load_log(run_dir) if e.get("kind") == "train"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manager():
    from studio.train.jobs import get_manager

    return get_manager()


def _runtime_imports(tree: ast.Module) -> set[str]:
    """The studio.train modules a module imports, left out those under `if TYPE_CHECKING:`
    (the shape of a stage's input is not a call back into that stage)."""
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    return {
        alias.name if node.module == "studio.train" else node.module.rsplit(".", 1)[-1]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("studio.train")
        if id(node) not in typing_only
        for alias in node.names
    }


def test_a_run_goes_one_way_through_the_train_package() -> None:
    """ui -> jobs -> prepare -> recipe.build -> loop, a pipe with no way back: prepare and
    recipe import nothing of the package, the loop never imports prepare and uses of the
    recipe its one `build` call (and ends with checks); only jobs and the CLI start a run."""
    allowed = {
        "tracking": set(),  # a leaf: where the curves go (TensorBoard, W&B)
        "distributed": set(),  # a leaf: ranks, the stop file, the accelerate command
        "fused_loss": set(),  # a leaf: TRL's fused-head loss without host syncs
        "memory": set(),  # a leaf: GPU memory given back, a fatal CUDA error remembered
        "heads": set(),  # a leaf: a loss head under the model's forward, by keyword
        "dpo": {"heads"},  # DPO's CPU answer-token head and held-out pair figures
        "tiled_mlp": set(),  # a leaf: the MLP in shards, recomputed in backward
        "prepare": {"distributed"},  # rank 0 alone writes the token cache
        "recipe": {"tracking", "distributed", "fused_loss", "dpo", "heads", "tiled_mlp"},
        "checks": set(),
        "plan": {"prepare", "recipe"},  # the Train tab's pre-flight, before any run starts
        "loop": {"recipe", "checks", "tracking", "distributed", "memory", "dpo"},
        "jobs": {"prepare", "loop", "distributed"},
        "cli": {"prepare", "jobs", "loop", "distributed"},
    }
    for name, may_import in allowed.items():
        tree = ast.parse((ROOT / "studio" / "train" / f"{name}.py").read_text(encoding="utf-8"))
        imported = _runtime_imports(tree)
        assert imported <= may_import, f"studio.train.{name} imports {imported - may_import}"
    loop = ast.parse((ROOT / "studio" / "train" / "loop.py").read_text(encoding="utf-8"))
    used = [
        node
        for node in ast.walk(loop)
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "recipe"
    ]
    assert {n.attr for n in used} <= {"build", "Built"}, "the loop reaches into the recipe"
    assert [n.attr for n in used].count("build") == 1, "the loop calls recipe.build once"


def test_invalid_settings_are_refused_before_any_model_loads(studio_home, tiny_rows, tmp_path):
    existing = {p.name for p in (studio_home / "runs").glob("*")}
    cases = [
        (tiny_cfg(tiny_rows, lora_r=0), "lora_r"),
        (tiny_cfg(tiny_rows, run_name="no spaces please"), "run_name"),
        (tiny_cfg(tiny_rows, dataset_path=str(tmp_path / "missing.jsonl")), "dataset_path"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\nnot json at all\n", encoding="utf-8")
    cases.append((tiny_cfg(tiny_rows, dataset_path=str(bad), dataset_format="messages"), "dataset"))
    for cfg, field in cases:
        with pytest.raises(ConfigError) as info:
            manager().start(cfg)
        assert info.value.field.startswith(field), (field, str(info.value))
    assert not manager().active
    assert {p.name for p in (studio_home / "runs").glob("*")} == existing  # no run folder made


def test_device_cuda_is_refused_without_a_gpu_and_accepted_with_one(studio_home, tiny_rows):
    """`device: cuda` is a ConfigError only where PyTorch sees no GPU. On a GPU machine the
    same settings pass the checks a run starts with (and nothing is trained here)."""
    import torch

    from studio.train.prepare import check_settings

    existing = {p.name for p in (studio_home / "runs").glob("*")}
    cfg = tiny_cfg(tiny_rows, device="cuda")
    if torch.cuda.is_available():
        device, reason = check_settings(cfg)
        assert device == "cuda" and reason.startswith("cuda: GPU 0, "), (device, reason)
        assert torch.cuda.get_device_name(0) in reason
    else:
        with pytest.raises(ConfigError) as info:
            manager().start(cfg)
        assert info.value.field == "device" and "no CUDA GPU is visible" in str(info.value)
        assert not manager().active
    assert {p.name for p in (studio_home / "runs").glob("*")} == existing  # no run folder made


@pytest.mark.slow
def test_lora_run_learns_and_leaves_a_complete_run_folder(embedded_model, tiny_rows, tokenizer):
    from peft import PeftModel

    from studio.data.chat_format import template_hash
    from studio.models.loader import greedy_answer, load_model_for_inference

    weights = embedded_model.path / "model.safetensors"
    weights_hash = sha256(weights)
    cfg = tiny_cfg(tiny_rows, run_name="lora-learns", max_steps=8, eval_steps=8, save_steps=3)

    run_dir = manager().start(cfg)
    assert runs.open_run(run_dir).status == "running"  # listed live while it trains
    snap = manager().wait(timeout=600)
    assert snap.state == "completed", snap.message + "\n" + "\n".join(snap.log_lines[-30:])

    # Loss fell from the first steps to the last, and the result's checks agree.
    losses = train_losses(run_dir)
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    checks = {c["name"]: c["ok"] for c in snap.checks}
    assert {k: checks.get(k) for k in ("adapter weights moved", "loss went down")} == {
        "adapter weights moved": True,
        "loss went down": True,
    }
    assert checks["intended device"] is True  # the answer checks: tests/test_train_checks.py

    # The run folder holds everything Chat and Export need.
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "tokenizer_config.json").is_file()
    assert RunConfig.load(run_dir / "run.yaml").max_steps == 8
    assert (run_dir / "chat_template.jinja").read_text(encoding="utf-8") == tokenizer.chat_template
    assert "PeftModel.from_pretrained" in (run_dir / "README.md").read_text(encoding="utf-8")
    meta = json.loads((run_dir / "training_metadata.json").read_text(encoding="utf-8"))
    assert meta["status"] == "completed"
    assert meta["base_model"]["revision"] == embedded_model.revision
    assert meta["dataset"]["sha256"] == sha256(tiny_rows)
    assert meta["dataset"]["rows"] == 32 and meta["dataset"]["val_rows"] == 4
    assert meta["settings"]["max_steps"] == 8 and meta["seed"] == 0
    assert {"torch", "transformers", "peft", "trl"} <= set(meta["versions"])
    assert meta["hardware"]["device"] == "cpu"
    assert meta["template_hash"] == template_hash(tokenizer)
    assert meta["final_metrics"]["train_loss"] == losses[-1]
    assert meta["final_metrics"]["eval_loss"] < meta["final_metrics"]["first_eval_loss"]
    assert meta["timings"]["train_s"] > 0
    entries = runs.load_log(run_dir)
    last = [e for e in entries if e.get("kind") == "train"][-1]
    for key in ("epoch", "learning_rate", "tokens_per_s", "elapsed_s", "eta_s", "peak_memory_mb"):
        assert last[key] is not None, key
    assert last["tokens_per_s"] > 0 and last["peak_memory_mb"] > 100
    assert [e["step"] for e in entries if e.get("kind") == "eval"] == [0, 8]
    assert [p.name for p in runs.checkpoints(run_dir)] == ["checkpoint-6", "checkpoint-8"]
    info = runs.open_run(run_dir)
    assert (info.status, info.steps, info.train_loss) == ("completed", 8, losses[-1])

    # Base weights untouched, on disk and through the adapter; the adapter changes answers.
    assert sha256(weights) == weights_hash
    base = load_model_for_inference(embedded_model.path)
    base_answer = greedy_answer(base, tokenizer, PROMPT, max_new_tokens=24)
    tuned = PeftModel.from_pretrained(
        load_model_for_inference(embedded_model.path), str(run_dir / "adapter")
    ).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    import torch

    with torch.no_grad():
        base_logits = base(ids).logits
        with tuned.disable_adapter():
            assert torch.allclose(tuned(ids).logits, base_logits, atol=1e-5)
    tuned_answer = greedy_answer(tuned, tokenizer, PROMPT, max_new_tokens=24)
    assert tuned_answer != base_answer
    assert '"category"' in tuned_answer, tuned_answer


@pytest.mark.slow
def test_qlora_run_on_cpu_learns(embedded_model, tiny_rows, tokenizer):
    from peft import PeftModel

    from studio.models.loader import greedy_answer, load_model_for_inference
    from studio.train.jobs import run_training

    cfg = tiny_cfg(tiny_rows, run_name="qlora", method="qlora", max_steps=6, val_fraction=0.0)
    result = run_training(cfg)
    assert result.status == "completed", result.message
    losses = train_losses(result.run_dir)
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses
    grad_norms = [e["grad_norm"] for e in runs.load_log(result.run_dir) if e.get("kind") == "train"]
    assert all(g > 0 for g in grad_norms), grad_norms
    # Every lora_B starts at zero: each one moved, so the adapter has something to merge.
    from safetensors.torch import load_file

    saved = load_file(str(result.run_dir / "adapter" / "adapter_model.safetensors"))
    lora_b = {k: v.abs().max().item() for k, v in saved.items() if "lora_B" in k}
    assert lora_b and min(lora_b.values()) > 0, lora_b
    meta = runs.read_metadata(result.run_dir)
    assert meta["settings"]["method"] == "qlora" and meta["status"] == "completed"
    base = load_model_for_inference(embedded_model.path)
    base_answer = greedy_answer(base, tokenizer, PROMPT, max_new_tokens=24)
    tuned = PeftModel.from_pretrained(base, str(result.run_dir / "adapter")).eval()
    assert greedy_answer(tuned, tokenizer, PROMPT, max_new_tokens=24) != base_answer


@pytest.mark.slow
def test_stop_keeps_a_loadable_adapter_and_resume_finishes(embedded_model, tiny_rows):
    from peft import PeftModel
    from transformers import TrainerCallback

    from studio.models.loader import load_model_for_inference
    from studio.train.jobs import JobBusyError

    class PressStopAtStep2(TrainerCallback):
        """What the Stop button does, at a known step."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                manager().stop()

    cfg = tiny_cfg(tiny_rows, run_name="stop-resume", max_steps=6, val_fraction=0.0, save_steps=50)
    run_dir = manager().start(cfg, extra_callbacks=[PressStopAtStep2()])
    with pytest.raises(JobBusyError):  # a second Start (another browser tab) is refused
        manager().start(cfg)
    snap = manager().wait(timeout=600)
    assert snap.state == "stopped", snap.message
    stopped_at = snap.step
    assert 2 <= stopped_at < 6
    assert runs.open_run(run_dir).status == "stopped"
    PeftModel.from_pretrained(
        load_model_for_inference(embedded_model.path), str(run_dir / "adapter")
    )
    assert runs.latest_checkpoint(run_dir).name == f"checkpoint-{stopped_at}"

    manager().resume(run_dir)
    snap = manager().wait(timeout=600)
    assert snap.state == "completed", snap.message
    steps = [e["step"] for e in runs.load_log(run_dir) if e.get("kind") == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    meta = runs.read_metadata(run_dir)
    assert meta["status"] == "completed"
    assert meta["resumes"][0]["from_step"] == stopped_at


@pytest.mark.slow
def test_out_of_memory_in_a_step_fails_the_run_with_advice_and_frees_it(tiny_rows):
    import torch
    from transformers import TrainerCallback

    class OutOfMemoryAtStep2(TrainerCallback):
        """Raise the real torch.OutOfMemoryError from the model's forward during step 2."""

        model_ref = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.model_ref = weakref.ref(model)

            def forward_hook(module, args, kwargs):
                if module.training and state.global_step == 1:  # the 2nd step is running
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            model.register_forward_pre_hook(forward_hook, with_kwargs=True)

    oom = OutOfMemoryAtStep2()
    cfg = tiny_cfg(tiny_rows, run_name="oom", batch_size=2, max_seq_len=512, val_fraction=0.0)
    run_dir = manager().start(cfg, extra_callbacks=[oom])
    snap = manager().wait(timeout=600)
    assert snap.state == "failed"
    assert "Out of" in snap.message and "memory" in snap.message
    text = " ".join(snap.advice)
    for advice in ("Halve the batch", "QLoRA", "max length", "gradient checkpointing"):
        assert advice in text, advice
    retry = snap.retry_config
    assert (retry["batch_size"], retry["grad_accum"]) == (1, 2)
    assert retry["method"] == "qlora" and retry["gradient_checkpointing"] is True
    assert retry["max_seq_len"] == 256
    meta = runs.read_metadata(run_dir)
    assert meta["status"] == "failed" and "memory" in meta["error"]
    assert meta["retry_config"] == retry
    gc.collect()
    assert oom.model_ref() is None, "the model was not freed after the OOM"

    # The manager is usable again: the suggested retry (with a single step) completes.
    # (LoRA instead of the suggested QLoRA only to keep the test short.)
    retry_cfg = RunConfig.from_dict({**retry, "max_steps": 1, "method": "lora", "run_name": "r"})
    manager().start(retry_cfg)
    assert manager().wait(timeout=600).state == "completed"


@pytest.mark.slow
def test_disk_full_while_saving_fails_the_run_and_keeps_earlier_checkpoints(tiny_rows):
    from transformers import TrainerCallback

    from studio.train.jobs import run_training

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full to simulate a full disk")

    class DiskFillsBeforeStep4Save(TrainerCallback):
        """Step 4's optimizer file lands on /dev/full, which answers every write with ENOSPC."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                folder = Path(args.output_dir) / "checkpoint-4"
                folder.mkdir(parents=True, exist_ok=True)
                os.symlink("/dev/full", folder / "optimizer.pt")

    cfg = tiny_cfg(tiny_rows, run_name="disk-full", max_steps=6, save_steps=2, val_fraction=0.0)
    result = run_training(cfg, extra_callbacks=[DiskFillsBeforeStep4Save()])
    assert result.status == "failed"
    assert result.message.startswith("Saving failed"), result.message
    assert "checkpoint-2" in " ".join(result.advice)
    assert [p.name for p in runs.checkpoints(result.run_dir)] == ["checkpoint-2"]
    meta = runs.read_metadata(result.run_dir)
    assert meta["status"] == "failed" and meta["error"].startswith("Saving failed")
    assert [e["step"] for e in runs.load_log(result.run_dir) if e.get("kind") == "train"] == [
        1,
        2,
        3,
        4,
    ]
