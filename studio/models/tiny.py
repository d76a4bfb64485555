"""Random-weight models of real architectures, small enough to train in seconds on a CPU.

The studio's users fine-tune Qwen 2.5/3, Gemma 2/3 and Llama 3.x; the only real model this
project has offline is SmolLM2 (Llama family). These builders make the other families from
their transformers config classes with a few layers, on the embedded SmolLM2 tokenizer
(vocabulary 49152) wearing the family's real chat template, so the whole path (tokenize,
train, chat, merge, GGUF) runs against each architecture's code. The GPU self-test
(`studio.tools.selftest`) builds a Qwen2.5-0.5B-shaped one the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
# Qwen2.5-0.5B-Instruct's shape (its config.json), with fewer layers and the embedded vocab.
QWEN25_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}


@dataclass(frozen=True)
class Family:
    """One architecture: its config class, its chat template file and end-of-turn marker."""

    config_class: str  # in transformers
    template: str | None  # llama.cpp's models/templates/<name>.jinja; None: the tokenizer's own
    marker: str | None  # the end-of-turn text, made one special token as in the real tokenizer
    extra: tuple[tuple[str, Any], ...] = ()


FAMILIES = {
    "llama": Family("LlamaConfig", "meta-llama-Llama-3.2-3B-Instruct", "<|eot_id|>"),
    "qwen2": Family("Qwen2Config", "Qwen-Qwen2.5-7B-Instruct", "<|im_end|>"),
    # transformers' GGUF loader (5.23) does not read Qwen3's head_dim from the file and keeps
    # Qwen3Config's 128, which every real Qwen3 has; the tiny one has it too.
    "qwen3": Family("Qwen3Config", "Qwen-Qwen3-0.6B", "<|im_end|>", (("head_dim", 128),)),
    # Gemma 3 writes turns like Gemma 2 (llama.cpp ships no Gemma 3 template file).
    "gemma2": Family("Gemma2Config", "google-gemma-2-2b-it", "<end_of_turn>"),
    "gemma3": Family(
        "Gemma3TextConfig", "google-gemma-2-2b-it", "<end_of_turn>", (("sliding_window", 64),)
    ),
}


def template_path(templates_dir: Path, family: str) -> Path | None:
    name = FAMILIES[family].template
    return None if name is None else templates_dir / f"{name}.jinja"


def build_tokenizer(family: str, templates_dir: Path | None) -> Any:
    """The embedded SmolLM2 tokenizer with the family's template and end-of-turn token."""
    from studio.models.loader import ensure_embedded_model, load_tokenizer

    tok = load_tokenizer(ensure_embedded_model().path)
    fam = FAMILIES[family]
    path = template_path(templates_dir, family) if templates_dir else None
    if path is not None:
        tok.chat_template = path.read_text(encoding="utf-8")
    if fam.marker and fam.marker not in tok.get_vocab():
        tok.add_tokens([fam.marker], special_tokens=True)
    return tok


def build_model(
    family: str,
    out_dir: Path,
    *,
    templates_dir: Path | None = None,
    shape: dict[str, Any] | None = None,
    layers: int = 2,
    dtype: str = "bfloat16",
    seed: int = 0,
    vocab_size: int | None = None,
) -> Path:
    """Save a random-weight `family` model with its tokenizer into `out_dir`; return it.

    `shape` overrides the tiny sizes (hidden 64, 2 layers); the vocabulary is the tokenizer's,
    so every token id the studio writes has an embedding, or `vocab_size` where that is larger
    (a real model's, so that its embeddings and LM head weigh what they do: the GPU benchmark).
    """
    import torch
    import transformers

    tok = build_tokenizer(family, templates_dir)
    fam = FAMILIES[family]
    sizes = {**TINY, **TINY_HEADS, **dict(fam.extra), **(shape or {}), "num_hidden_layers": layers}
    config = getattr(transformers, fam.config_class)(
        **sizes,
        vocab_size=max(len(tok), vocab_size or 0),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=2048,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    template = fam.template if templates_dir else "the embedded tokenizer's own"
    note = {"family": family, "random_weights": True, "template": template, "sizes": sizes}
    (out_dir / "studio_tiny.json").write_text(json.dumps(note, indent=2), encoding="utf-8")
    return out_dir
