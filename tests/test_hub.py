"""The model catalogue and hub downloads, against a real HTTP server on 127.0.0.1 that speaks
the hub's API (tests/hub_server.py) to the real huggingface_hub client, through the studio's
CLI (`python -m studio.models`) in a subprocess with HF_ENDPOINT and its own HF_HOME."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from studio.models import catalog
from tests.hub_server import VALID_TOKEN, HubServer, Repo, standard_repos, tiny_model_files

ROOT = Path(__file__).resolve().parents[1]
TINY = "studio-test/tiny-model"
LINE = re.compile(r"\[\s*(\d+)%\] ([\d.]+) MB of ([\d.]+) MB")


# --------------------------------------------------------------------------- catalogue


def test_catalog_loads_and_knows_every_model_shape_and_twin():
    from studio.hardware import vram

    models = catalog.load_catalog()
    families = {m.family for m in models.values()}
    assert {"Qwen2.5", "Qwen3", "Llama 3.2", "Llama 3.1", "Gemma 2", "Gemma 3"} <= families
    assert {"Phi", "Mistral", "SmolLM2", "SmolLM3"} <= families
    for entry in models.values():
        assert entry.id in vram.REFERENCE_CONFIGS, f"{entry.id}: no shape for the fit verdict"
        if entry.bnb_4bit:
            assert catalog.is_prequantized(entry.bnb_4bit)
            assert catalog.original_of(entry.bnb_4bit) == entry.id
            assert catalog.lookup(entry.bnb_4bit) == entry
        assert not catalog.is_prequantized(entry.id)
        assert catalog.original_of(entry.id) is None
    # Unsloth's other naming of the same twin, and an unknown one
    assert catalog.original_of("unsloth/Qwen3-4B-unsloth-bnb-4bit") == "Qwen/Qwen3-4B"
    meta = "unsloth/Meta-Llama-3.1-8B-Instruct-unsloth-bnb-4bit"  # "Meta-" before Unsloth's name
    assert catalog.original_of(meta) == "meta-llama/Llama-3.1-8B-Instruct"
    assert catalog.original_of("someone/unheard-of-7b-bnb-4bit") is None
    assert models["Qwen/Qwen2.5-0.5B-Instruct"].download_gb == pytest.approx(0.99, abs=0.02)
    assert models["meta-llama/Llama-3.1-8B-Instruct"].gated


def test_catalog_refuses_a_bad_entry_naming_model_and_field(tmp_path):
    good = yaml.safe_load(catalog.CATALOG_FILE.read_text(encoding="utf-8"))
    entry = dict(good["Qwen/Qwen3-4B"])
    for change, field in [({"gated": "yes"}, "gated"), ({"download_gb": -1}, "download_gb")]:
        path = tmp_path / "catalog.yaml"
        path.write_text(yaml.safe_dump({"Qwen/Qwen3-4B": {**entry, **change}}), encoding="utf-8")
        with pytest.raises(catalog.CatalogError, match=rf"Qwen/Qwen3-4B\.{field}"):
            catalog.load_catalog(path)
    path.write_text(yaml.safe_dump({"a/b": {**entry, "licence_typo": "x"}}), encoding="utf-8")
    with pytest.raises(catalog.CatalogError, match="licence_typo"):
        catalog.load_catalog(path)


# --------------------------------------------------------------------------- CLI downloads


def _env(hub: HubServer | None, hf_home: Path, endpoint: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint or hub.url, HF_HOME=str(hf_home), PYTHONUNBUFFERED="1")
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    return env


def run_cli(env: dict[str, str], data_dir: Path, *args: str, stdin: str | None = None):
    cmd = [sys.executable, "-m", "studio.models", *args, "--data-dir", str(data_dir)]
    return subprocess.run(
        cmd, cwd=ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=180
    )


def progress_lines(text: str) -> list[tuple[int, float, float]]:
    return [(int(p), float(d), float(t)) for p, d, t in LINE.findall(text)]


def downloaded_weights(hf_home: Path, repo_id: str) -> bytes:
    folder = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    return next(folder.glob("snapshots/*/model.safetensors")).read_bytes()


def test_cli_download_shows_bytes_and_resumes_after_a_dropped_connection(tmp_path):
    repos = standard_repos(weight_bytes=6 * 2**20)
    drop = {(TINY, "model.safetensors")}
    with HubServer(repos, rate_bps=3 * 2**20, drop_once=drop) as hub:
        done = run_cli(_env(hub, tmp_path / "hf"), tmp_path / "studio", TINY)
        ranges = [r["range"] for r in hub.requests if r["path"].endswith("model.safetensors")]
    assert done.returncode == 0, done.stdout + done.stderr
    lines = progress_lines(done.stdout)
    total = sum(len(v) for k, v in repos[TINY].files.items() if k != "README.md") / 1e6
    assert len(lines) >= 3, done.stdout  # the bytes move while it downloads, not only at the end
    assert all(t == pytest.approx(total, abs=0.05) for _, _, t in lines)
    assert [d for _, d, _ in lines] == sorted(d for _, d, _ in lines)
    assert lines[-1][0] == 100 and "MB/s" in done.stdout and "left" in done.stdout
    assert any(r.startswith("bytes=") and r != "bytes=0-" for r in ranges), ranges  # resumed
    assert downloaded_weights(tmp_path / "hf", TINY) == repos[TINY].files["model.safetensors"]
    assert "README.md" not in done.stdout
    assert f"{TINY}: " in done.stdout and "(hub," in done.stdout


def test_cli_cancel_keeps_the_partial_file_and_the_next_run_continues(tmp_path):
    repos = standard_repos(weight_bytes=8 * 2**20)
    env = _env(None, tmp_path / "hf", endpoint="http://unused")
    with HubServer(repos, rate_bps=2 * 2**20) as hub:
        env["HF_ENDPOINT"] = hub.url
        cmd = [sys.executable, "-m", "studio.models", TINY, "--data-dir", str(tmp_path / "s")]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        seen = ""
        deadline = time.time() + 60
        while time.time() < deadline:
            line = proc.stdout.readline()
            seen += line
            got = progress_lines(line)
            if got and got[0][1] >= 2.0:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, seen + out
        partial = list((tmp_path / "hf" / "hub").rglob("*.incomplete"))
        assert partial and partial[0].stat().st_size >= 2 * 2**20
        size_at_cancel = partial[0].stat().st_size
        assert size_at_cancel < len(repos[TINY].files["model.safetensors"])

        again = run_cli(env, tmp_path / "s", TINY)
        ranges = [r["range"] for r in hub.requests if r["path"].endswith("model.safetensors")]
    assert again.returncode == 0, again.stdout + again.stderr
    first = progress_lines(again.stdout)[0]
    assert first[1] >= size_at_cancel / 1e6 - 0.05, again.stdout  # starts where it stopped
    assert f"bytes={size_at_cancel}-" in ranges
    assert downloaded_weights(tmp_path / "hf", TINY) == repos[TINY].files["model.safetensors"]


def test_cli_gated_model_gives_the_steps_and_a_stored_token_opens_it(tmp_path):
    gated = "studio-test/gated-model"
    with HubServer(standard_repos(weight_bytes=2**20)) as hub:
        env = _env(hub, tmp_path / "hf")
        refused = run_cli(env, tmp_path / "studio", gated)
        assert refused.returncode == 1
        for step in ("accept the licence", "read token", "token field", "hf auth login"):
            assert step in refused.stderr, refused.stderr
        assert "connect to the internet" not in refused.stderr  # wrong advice for a gated repo

        bad = run_cli(env, tmp_path / "studio", "--login", stdin="hf_wrong\n")
        assert bad.returncode == 1 and "refused this token" in bad.stderr
        login = run_cli(env, tmp_path / "studio", "--login", stdin=VALID_TOKEN + "\n")
        assert login.returncode == 0, login.stdout + login.stderr
        assert VALID_TOKEN not in login.stdout + login.stderr
        assert (tmp_path / "hf" / "token").read_text(encoding="utf-8").strip() == VALID_TOKEN

        done = run_cli(env, tmp_path / "studio", gated)
    assert done.returncode == 0, done.stdout + done.stderr
    assert downloaded_weights(tmp_path / "hf", gated)
    studio_files = [p for p in (tmp_path / "studio").rglob("*") if p.is_file()]
    assert not any(VALID_TOKEN.encode() in p.read_bytes() for p in studio_files)


def test_cli_refuses_a_download_larger_than_the_disk_before_the_first_byte(tmp_path):
    with HubServer(standard_repos(weight_bytes=2**20)) as hub:
        done = run_cli(_env(hub, tmp_path / "hf"), tmp_path / "studio", "studio-test/huge-model")
        fetched = [r for r in hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]]
    assert done.returncode == 1
    assert "Not enough disk space" in done.stderr and "1000000.00 GB" in done.stderr
    assert fetched == []  # metadata only: not one file was fetched
    assert not list((tmp_path / "hf").rglob("*.incomplete"))


def test_cli_names_not_found_and_offline(tmp_path):
    with HubServer(standard_repos(weight_bytes=2**20)) as hub:
        missing = run_cli(_env(hub, tmp_path / "hf"), tmp_path / "s", "studio-test/no-such")
        port = hub.url.rsplit(":", 1)[1]
    assert missing.returncode == 1 and "is not on the hub" in missing.stderr
    # the server is gone: nothing listens on its port any more
    offline = run_cli(
        _env(None, tmp_path / "hf", endpoint=f"http://127.0.0.1:{port}"), tmp_path / "s", TINY
    )
    assert offline.returncode == 1 and "Cannot reach the hub" in offline.stderr, offline.stderr


def test_picking_a_model_fetches_its_tokenizer_files_not_its_weights(tmp_path):
    """The Train tab's pre-flight needs the tokenizer of the picked model: that must not start
    a many-GB download of the weights that nobody sees (it did: "Checking the hub" and then
    the whole snapshot)."""
    code = f"from studio.models.loader import tokenizer_folder; print(tokenizer_folder({TINY!r}))"
    with HubServer(standard_repos(weight_bytes=2**20)) as hub:
        env = _env(hub, tmp_path / "hf")
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
        )
        weights = [r for r in hub.requests if r["path"].endswith(".safetensors")]
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip().splitlines()[-1])
    assert (folder / "config.json").is_file() and not (folder / "model.safetensors").exists()
    assert [r for r in weights if r["method"] == "GET"] == []


def test_a_pre_quantized_twin_is_named_so(tmp_path):
    """A `*-bnb-4bit` download says it is QLoRA-only and names its 16-bit original."""
    twin = "unsloth/Qwen2.5-0.5B-Instruct-bnb-4bit"
    repos = {twin: Repo(tiny_model_files(2**16))}
    with HubServer(repos) as hub:
        done = run_cli(_env(hub, tmp_path / "hf"), tmp_path / "s", twin)
    assert done.returncode == 0, done.stderr
    assert "pre-quantized 4-bit" in done.stdout and "Qwen/Qwen2.5-0.5B-Instruct" in done.stdout


def test_served_weights_are_a_real_safetensors_file():
    from safetensors.numpy import load

    files = tiny_model_files(2**16)
    tensors = load(files["model.safetensors"])
    assert tensors["model.embed_tokens.weight"].shape[1] == 64
    assert hashlib.sha256(files["model.safetensors"]).hexdigest()


@pytest.mark.slow
def test_a_stored_token_never_reaches_a_run_folder(embedded_model, studio_home, tmp_path):
    """A real two-step run with a token stored (token file) and in HF_TOKEN: no file of the
    run folder (run.yaml, metadata, logs, adapter card) holds it."""
    import json

    from studio.config import RunConfig

    rows = tmp_path / "rows.jsonl"
    with rows.open("w", encoding="utf-8") as fh:
        for i in range(8):
            turn = [
                {"role": "user", "content": f"Câu hỏi {i}?"},
                {"role": "assistant", "content": "OK"},
            ]
            fh.write(json.dumps({"messages": turn}, ensure_ascii=False) + "\n")
    cfg = RunConfig(run_name="token-leak", dataset_path=str(rows), max_steps=2, batch_size=2)
    cfg = cfg.replace(max_seq_len=64, val_fraction=0.0, save_steps=2, allow_pii=True)
    yaml_path = cfg.save(tmp_path / "run.yaml")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "token").write_text(VALID_TOKEN, encoding="utf-8")
    # No hub here: the endpoint refuses at once and the embedded model is used.
    env = _env(None, tmp_path / "hf", endpoint="http://127.0.0.1:9")
    env["HF_TOKEN"] = VALID_TOKEN
    cmd = [sys.executable, "-m", "studio.train", str(yaml_path), "--data-dir", str(studio_home)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = Path(re.search(r"Run folder: (.+)", done.stdout).group(1).strip())
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "run.yaml" for p in files) and len(files) > 3
    leaked = [str(p) for p in files if VALID_TOKEN.encode() in p.read_bytes()]
    assert leaked == []
    assert VALID_TOKEN not in done.stdout + done.stderr
