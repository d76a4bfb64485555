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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from studio import compat, gpu, paths
from studio.data import chat_format
from studio.export.common import ExportError, Message, Progress, noop
from studio.export.merge import (
    SANITY_TOKENS,
    SanityCheck,
    available_ram,
    busy_note,
    compare,
    gpu_taken,
    teacher_logits,
)
from studio.models import loader as models
from studio.models.generate import greedy_each
from studio.runs import read_json
from studio.util import short_error

# f16 and q8_0 come straight from llama.cpp's converter; the k-quants (what most Ollama and
# llama.cpp users run) need llama.cpp's quantizer, which takes the f16 file as input.
CONVERTER_TYPES = ("f16", "q8_0")
K_QUANTS = ("q4_K_M", "q5_K_M", "q6_K")
GGUF_TYPES = (*CONVERTER_TYPES, *K_QUANTS, "none")
# llama.cpp's own quantizer (`llama_model_quantize` in a prebuilt libllama) from a PyPI wheel.
# Optional: its Linux wheels need glibc >= 2.38 (Ubuntu 24.04, Debian 13); elsewhere the
# export hands the f16 file to Ollama's quantizer (`ollama create --quantize`).
QUANTIZER_PACKAGE = "llama-cpp-py-sync==0.11739"
_FTYPES = {"q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
_FTYPES["q6_K"] = "LLAMA_FTYPE_MOSTLY_Q6_K"
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
        done = subprocess.run(
            cmd, capture_output=True, text=True, encoding="utf-8", errors="replace",
            timeout=1800, check=False,
        )  # fmt: skip
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
        compat.replace(staging, target)
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
    if outtype not in CONVERTER_TYPES:
        raise ExportError(f"GGUF type {outtype!r}: the converter writes f16 or q8_0.")
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


@dataclass(frozen=True)
class VerifyPlan:
    """Where the GGUF file is loaded back to be checked, or why it is not (device None)."""

    device: str | None  # "cuda", "cpu", or None: skipped
    dtype: str | None  # "float32", "bfloat16", "float16"
    reason: str


def gguf_params(gguf_file: Path) -> int:
    """Weights in a GGUF file, read from its tensor table (memory-mapped, nothing loaded)."""
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(gguf_file)).tensors)


def plan_verify(
    params: int, gpu_free: int | None, gpu_dtype: str | None, ram_free: int | None
) -> VerifyPlan:
    """Check on the GPU in its compute dtype when it fits, else on the CPU in float32 (exact)
    or bfloat16 when RAM allows, else skip. transformers dequantizes a GGUF into the dtype
    asked for: float32 on the CPU needs 4 bytes a weight, about 30 GiB for an 8B model."""
    gib = 2**30
    if gpu_free is not None and gpu_dtype and params * 2 * 1.3 < gpu_free:
        why = f"on the GPU in {gpu_dtype} ({gpu_free / gib:.1f} GiB free)"
        return VerifyPlan("cuda", gpu_dtype, why)
    if ram_free is None or params * 4 * 1.5 < ram_free:
        return VerifyPlan("cpu", "float32", "on the CPU in float32")
    if params * 2 * 1.5 < ram_free:
        why = f"on the CPU in bfloat16: float32 would need {params * 4 / gib:.1f} GiB of RAM"
        return VerifyPlan("cpu", "bfloat16", f"{why}, {ram_free / gib:.1f} GiB are free")
    need = params * 2 * 1.5 / gib
    return VerifyPlan(
        None,
        None,
        f"not checked: loading it back needs about {need:.1f} GiB of free RAM (or GPU memory),"
        f" {ram_free / gib:.1f} GiB are free. Test it in Ollama or llama.cpp instead.",
    )


def verify_plan(gguf_file: Path) -> VerifyPlan:
    """`plan_verify` for this file on this machine, measured now."""
    import torch

    gpu_free = gpu_dtype = None
    busy = gpu_taken()  # a GPU training run: the check must not take its memory
    if torch.cuda.is_available() and busy is None:
        from studio.models.precision import precision

        gpu_free = int(torch.cuda.mem_get_info()[0])
        gpu_dtype = str(precision("cuda").torch_dtype).removeprefix("torch.")
    plan = plan_verify(gguf_params(gguf_file), gpu_free, gpu_dtype, available_ram())
    return replace(plan, reason=plan.reason + busy_note(busy)) if busy else plan


def check_gguf(
    gguf_file: Path,
    tok: Any,
    convs: list[list[Message]],
    prompt_ids: list[list[int]],
    merged_out: tuple[list[list[int]], list[Any]],
    max_new_tokens: int = SANITY_TOKENS,
    plan: VerifyPlan | None = None,
) -> SanityCheck:
    """Load the GGUF back with transformers and compare greedy answers and prompt tokens,
    where `plan` says (default: float32 on the CPU)."""
    import torch
    from transformers import AutoTokenizer

    plan = plan or VerifyPlan("cpu", "float32", "on the CPU in float32")

    folder, name = str(gguf_file.parent), gguf_file.name
    gtok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = [chat_format.render(tok, c, add_generation_prompt=True) for c in convs]
    same_tokens = all(
        list(gtok(t, add_special_tokens=False)["input_ids"]) == ids
        for t, ids in zip(texts, prompt_ids, strict=True)
    )
    dtype = getattr(torch, plan.dtype or "float32")
    model = models.load_model(folder, device=plan.device or "cpu", dtype=dtype, gguf_file=name)
    model.eval()
    expected, expected_logits = merged_out
    got = greedy_each(model, tok, prompt_ids, max_new_tokens)
    on_ref = [teacher_logits(model, p, r) for p, r in zip(prompt_ids, expected, strict=True)]
    model = None
    gpu.free_memory()
    title = "GGUF file (loaded back) vs merged folder"
    check = compare(title, convs, tok, expected, got, expected_logits, on_ref)
    check.note = (
        "The GGUF tokenizer splits the prompts into the same tokens."
        if same_tokens
        else "WARNING: the GGUF tokenizer splits the prompts differently from the original."
    ) + f" Loaded back {plan.reason}."
    if not same_tokens:
        for c in check.cases:
            c.match = c.near_tie = False
    return check


# --------------------------------------------------------------------------- k-quants


def normalize_gguf_type(name: str | None) -> str:
    """The canonical spelling of a GGUF type ("Q4_K_M" -> "q4_K_M"); ExportError if unknown."""
    wanted = (name or "none").strip()
    for t in GGUF_TYPES:
        if t.lower() == wanted.lower():
            return t
    raise ExportError(f"GGUF type {wanted!r}: use one of {', '.join(GGUF_TYPES)}.")


def converter_type(gguf: str) -> str:
    """What the converter writes for a requested type: k-quants start from an f16 file."""
    return "f16" if gguf in K_QUANTS else gguf


def local_quantizer() -> tuple[Any, Any] | str:
    """(llama.cpp's library, its cffi handle), or the reason it cannot be used here."""
    try:
        from llama_cpp_py_sync._cffi_bindings import get_ffi, get_lib
    except ImportError:
        return f"llama.cpp's quantizer is not installed (pip install {QUANTIZER_PACKAGE})"
    try:
        return get_lib(), get_ffi()
    except Exception as exc:  # e.g. "GLIBC_2.38 not found" on older Linux distributions
        return f"llama.cpp's quantizer ({QUANTIZER_PACKAGE}) does not load here: {short_error(exc)}"


def quantize_gguf(f16_file: Path, qtype: str, progress: Progress | None = None) -> Path | str:
    """Quantize an f16 GGUF to a k-quant with llama.cpp's own `llama_model_quantize`.

    Returns the new file (next to the f16 one, named with the type), or, when the quantizer
    cannot be had here, the reason: the caller then hands the f16 file to Ollama's quantizer.
    """
    if qtype not in K_QUANTS:
        raise ExportError(f"{qtype!r} is not a k-quant: use one of {', '.join(K_QUANTS)}.")
    found = local_quantizer()
    if isinstance(found, str):
        return found
    lib, ffi = found
    out = f16_file.with_name(f16_file.name.replace("-f16.gguf", f"-{qtype}.gguf"))
    if out == f16_file:
        out = f16_file.with_suffix(f".{qtype}.gguf")
    (progress or noop)(f"Quantizing to {qtype} with llama.cpp's llama_model_quantize", 0.86)
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, _FTYPES[qtype])
    params.nthread = max(1, os.cpu_count() or 1)
    ptr = ffi.new("llama_model_quantize_params *", params)
    rc = lib.llama_model_quantize(str(f16_file).encode(), str(out).encode(), ptr)
    if rc != 0 or not out.is_file():
        with contextlib.suppress(OSError):
            out.unlink()
        raise ExportError(f"llama.cpp's quantizer failed on {f16_file.name} (code {rc}).")
    return out


def quantize_route(gguf: str, gguf_file: Path | None) -> str | None:
    """The k-quant Ollama must still apply (`ollama create --quantize`), or None.

    None when no k-quant was asked for, or when the file already is one (the local route).
    """
    if gguf not in K_QUANTS or gguf_file is None:
        return None
    return None if gguf_file.name.endswith(f"-{gguf}.gguf") else gguf


def route_note(gguf: str, gguf_file: Path | None, why_not_local: str | None) -> str | None:
    """Which tool produced which file, in plain words (shown by the CLI and the UI)."""
    if gguf not in K_QUANTS or gguf_file is None:
        return None
    if quantize_route(gguf, gguf_file) is None:
        return (
            f"{gguf_file.name} was quantized here by llama.cpp's own quantizer"
            f" (llama_model_quantize, {QUANTIZER_PACKAGE}) from the checked f16 GGUF. It was"
            f" NOT compared with the merged model: {gguf} is lossy by design."
        )
    return (
        f"No {gguf} file was written here ({why_not_local}). {gguf_file.name} is the f16 GGUF"
        f" (checked above); `ollama create --quantize {gguf}` makes the {gguf} model from it"
        f" with Ollama's quantizer (llama.cpp's code inside Ollama). That {gguf} model was NOT"
        " checked here."
    )
