"""Ollama step: cut the chat template into a Go TEMPLATE, and write the Modelfile.

The template pieces are found by rendering probe conversations with the model's own chat
template (`derive_chat_format`) and checked against it (`verify_chat_format`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.data import chat_format
from studio.export import gotemplate
from studio.export.common import Message
from studio.runs import read_json

# Sampling defaults for Ollama when the model's generation_config names none: a small
# fine-tune keeps the format it learned best with little randomness.
DEFAULT_SAMPLING = {"temperature": 0.2, "top_p": 0.9, "repeat_penalty": 1.0}


@dataclass
class ChatFormat:
    """The chat template cut into the pieces an Ollama template needs.

    Found by rendering probe conversations with the model's own template, so it is derived
    from the template itself rather than guessed from the model's name.
    """

    family: str  # chatml, llama3, gemma or other
    user_start: str
    user_end: str
    assistant_start: str
    assistant_end: str
    system_mode: str  # "turn" (own block), "first_user" (inside the first user turn), "none"
    system_start: str = ""
    system_end: str = ""
    system_sep: str = ""  # first_user mode: between the system text and the user's
    system_always: bool = False  # the template writes a system block even with no system text
    default_system: str | None = None  # what the template says when no system message is given
    bos: str = ""  # stripped from renders: llama.cpp/Ollama add BOS themselves
    exact: bool = False  # the Ollama rendering matched the template on every probe
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- chat template


def _family(template: str) -> str:
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "<start_of_turn>" in template:
        return "gemma"
    return "other"


def derive_chat_format(tok: Any) -> ChatFormat:
    """Cut the model's chat template into turn pieces: the renders of chat_format's probe
    conversations (the same probes its end-of-turn reading uses), compared piece by piece."""
    template = getattr(tok, "chat_template", None) or ""
    family = _family(template)
    # Only a BOS the template itself writes is stripped (SmolLM2's BOS is <|im_start|>, which
    # its template writes as part of every turn, not as a BOS).
    bos = (tok.bos_token or "") if "bos_token" in template else ""
    probe = chat_format.probe_conversation("system user assistant user")
    S, U1, A1, U2 = (m["content"] for m in probe)

    def render(roles: str, gen: bool) -> str:
        msgs = chat_format.probe_conversation(roles)
        text = chat_format.render(tok, msgs, add_generation_prompt=gen)
        return text[len(bos) :] if bos and text.startswith(bos) else text

    t_user = render("user", True)
    t_user_nogen = render("user", False)
    t_pair = render("user assistant", False)
    t_three = render("user assistant user", True)

    if U1 not in t_user or U1 not in t_user_nogen or A1 not in t_pair:
        # The template hides the probes themselves: nothing to cut; a plain approximation.
        fmt = ChatFormat(family, "", "\n", "", "\n", "none", bos=bos)
        fmt.problems.append("the template's output does not show the messages it was given")
        return verify_chat_format(tok, fmt)
    assistant_end = t_pair[t_pair.index(A1) + len(A1) :]
    pre_user = t_user[: t_user.index(U1)]
    problems: list[str] = []
    if A1 in t_three and U2 in t_three[t_three.index(A1) :]:
        between = t_three[t_three.index(A1) + len(A1) : t_three.index(U2, t_three.index(A1))]
    else:  # the template drops earlier assistant turns (e.g. keeps only the last one)
        between = assistant_end + pre_user
        problems.append("the template drops earlier assistant turns; Ollama keeps them")
    if not between.startswith(assistant_end):  # e.g. a template that adds EOS only at the end
        assistant_end = chat_format.common_prefix([assistant_end, between])
    user_start = between[len(assistant_end) :]
    user_end = t_user_nogen[t_user_nogen.index(U1) + len(U1) :]
    after_user = t_user[t_user.index(U1) + len(U1) :]
    if after_user.startswith(user_end):
        assistant_start = after_user[len(user_end) :]
    else:
        user_end, assistant_start = "", after_user
    fmt = ChatFormat(family, user_start, user_end, assistant_start, assistant_end, "none", bos=bos)
    fmt.problems += problems
    default_block = (
        pre_user[: len(pre_user) - len(user_start)] if pre_user.endswith(user_start) else pre_user
    )

    try:
        t_sys = render("system user", True)
    except chat_format.TemplateError:
        t_sys = ""
    if S in t_sys and U1 in t_sys and t_sys.index(S) < t_sys.index(U1):
        before, mid = t_sys[: t_sys.index(S)], t_sys[t_sys.index(S) + len(S) : t_sys.index(U1)]
        if mid.endswith(user_start) and user_start not in before:
            fmt.system_mode = "turn"
            fmt.system_start, fmt.system_end = before, mid[: len(mid) - len(user_start)]
            if default_block:
                inner_start, inner_end = fmt.system_start, fmt.system_end
                if default_block.startswith(inner_start) and default_block.endswith(inner_end):
                    inner = default_block[len(inner_start) : len(default_block) - len(inner_end)]
                    fmt.default_system = inner or None
                    fmt.system_always = not inner
                else:
                    fmt.problems.append("the template writes text before the first turn")
        elif before == user_start:
            fmt.system_mode, fmt.system_sep = "first_user", mid
    elif default_block:
        fmt.problems.append("the template writes text before the first turn")
    verify_chat_format(tok, fmt)
    return fmt


def render_like_ollama(fmt: ChatFormat, messages: list[Message], system: str | None) -> str:
    """The prompt Ollama builds from the TEMPLATE `ollama_template(fmt)` writes.

    The template text itself is executed (studio.export.gotemplate, a Go text/template
    subset) on the data Ollama passes: the check covers the very string in the Modelfile.
    `system` is the Modelfile's SYSTEM, used when the chat has no system message.
    """
    return gotemplate.render(ollama_template(fmt), gotemplate.ollama_data(messages, system))


def _probe_conversations() -> list[list[Message]]:
    vi_sys = "Bạn là trợ lý hỗ trợ.\nTrả lời ngắn gọn."
    return [
        [{"role": "user", "content": "Xin chào! Bạn khỏe không?"}],
        [{"role": "system", "content": vi_sys}, {"role": "user", "content": "Hello\nthere"}],
        [
            {"role": "system", "content": vi_sys},
            {"role": "user", "content": "สวัสดีครับ"},
            {"role": "assistant", "content": '{"category": "other"}'},
            {"role": "user", "content": "Cảm ơn!"},
        ],
        [
            {"role": "user", "content": "One"},
            {"role": "assistant", "content": "Two"},
            {"role": "user", "content": "Three"},
        ],
    ]


def verify_chat_format(tok: Any, fmt: ChatFormat) -> ChatFormat:
    """Compare the Ollama rendering with the model's own template on probe conversations."""
    fmt.exact = not fmt.problems
    for conv in _probe_conversations():
        if fmt.system_mode == "none" and any(x["role"] == "system" for x in conv):
            continue
        try:
            want = chat_format.render(tok, conv, add_generation_prompt=True)
        except chat_format.TemplateError:
            continue
        if fmt.bos and want.startswith(fmt.bos):
            want = want[len(fmt.bos) :]
        got = render_like_ollama(fmt, conv, fmt.default_system)
        if got != want:
            fmt.exact = False
            at = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
            at = min(len(got), len(want)) if at is None else at
            fmt.problems.append(
                f"a {len(conv)}-message chat renders differently from character {at}:"
                f" template {want[at : at + 40]!r} vs Ollama {got[at : at + 40]!r}"
            )
            break
    return fmt


def _go(text: str) -> str:
    """Literal text inside a Go template ("{{" would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(fmt: ChatFormat) -> str:
    """A Go template for Ollama that renders chats the way the model's chat template does."""
    us, ue = _go(fmt.user_start), _go(fmt.user_end)
    as_, ae = _go(fmt.assistant_start), _go(fmt.assistant_end)
    out = ""
    if fmt.system_mode == "turn":
        block = _go(fmt.system_start) + "{{ .System }}" + _go(fmt.system_end)
        out += block if fmt.system_always else "{{ if .System }}" + block + "{{ end }}"
    elif fmt.system_mode == "first_user":
        out += "{{ $system := .System }}"
    out += "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    out += '{{ if eq .Role "user" }}' + us
    if fmt.system_mode == "first_user":
        out += "{{ if $system }}{{ $system }}" + _go(fmt.system_sep) + '{{ $system = "" }}{{ end }}'
    out += "{{ .Content }}" + ue
    out += '{{ else if eq .Role "assistant" }}' + as_ + "{{ .Content }}"
    out += "{{ if not $last }}" + ae + "{{ end }}{{ end }}"
    out += '{{ if and $last (ne .Role "assistant") }}' + as_ + "{{ end }}{{ end }}"
    return out


def stop_tokens(fmt: ChatFormat, tok: Any, generation_eos: list[int] | None = None) -> list[str]:
    """Strings that end an assistant turn: the model's end-of-turn marker, then EOS, then the
    generation config's EOS tokens (the stop rule of `studio.models.generate.stop_ids`).

    The marker is the one training taught the model to emit (chat_format's reading of the
    template, the same the loss mask uses); the text the template writes after a reply is
    the fallback when the template names none.
    """
    marker = chat_format.end_of_turn_marker(tok) or fmt.assistant_end
    extra = [str(tok.convert_ids_to_tokens(int(i))) for i in generation_eos or []]
    out: list[str] = []
    for s in (marker.strip(), tok.eos_token or "", *extra):
        if s and s not in out:
            out.append(s)
    return out


# --------------------------------------------------------------------------- Modelfile


def ollama_name(run_name: str) -> str:
    """A model name Ollama accepts: lowercase letters, digits, '-', '_' and '.'."""
    name = re.sub(r"[^a-z0-9._-]+", "-", run_name.lower()).strip("-._")
    return name or "lora-studio-model"


def _modelfile_text(text: str) -> str:
    """A triple-quoted Modelfile value cannot hold three quotes in a row."""
    return text.replace('"""', '"\u201d"')


def sampling_parameters(merged_dir: Path, base_path: Path) -> tuple[dict[str, Any], str]:
    """Ollama sampling parameters and where they came from."""
    gen = read_json(merged_dir / "generation_config.json")
    cfg = read_json(merged_dir / "config.json")
    params: dict[str, Any] = {}
    src = "the model's generation_config.json"
    if gen.get("do_sample") and gen.get("temperature") is not None:
        params["temperature"] = gen["temperature"]
        for key, name in (("top_p", "top_p"), ("top_k", "top_k")):
            if gen.get(key) is not None:
                params[name] = gen[key]
        if gen.get("repetition_penalty") is not None:
            params["repeat_penalty"] = gen["repetition_penalty"]
    else:
        params.update(DEFAULT_SAMPLING)
        src = "LoRA Studio's defaults (the model's generation_config.json names none)"
    ctx = int(cfg.get("max_position_embeddings") or 4096)
    params["num_ctx"] = min(ctx, 4096)
    return params, src


def build_modelfile(
    *,
    from_path: str,
    fmt: ChatFormat,
    stops: list[str],
    system: str | None,
    system_note: str,
    params: dict[str, Any],
    params_source: str,
    header: list[str],
) -> str:
    """The Modelfile text (FROM, TEMPLATE, SYSTEM, PARAMETERs) with comments that say why."""
    lines = [f"# {h}" for h in header]
    lines += ["", f"FROM {from_path}", ""]
    if fmt.exact:
        lines.append(
            f"# TEMPLATE: derived from the model's chat template ({fmt.family} style) and checked"
            " against it on probe chats: Ollama builds the same prompt text."
        )
    else:
        lines.append(
            f"# TEMPLATE: APPROXIMATED from the model's chat template ({fmt.family} style); it"
            " did not match on every probe chat, so check it before relying on it:"
        )
        lines += [f"#   - {p}" for p in fmt.problems] or ["#   - (no details)"]
    lines.append(f'TEMPLATE """{_modelfile_text(ollama_template(fmt))}"""')
    lines.append("")
    if fmt.system_mode == "none":
        lines.append("# No SYSTEM: this model's chat template has no place for a system prompt.")
    elif system:
        lines.append(f"# SYSTEM: {system_note}")
        lines.append(f'SYSTEM """{_modelfile_text(system)}"""')
    else:
        lines.append(f"# No SYSTEM: {system_note}")
    lines.append("")
    lines.append("# Stop at the end-of-turn token the model was trained to emit.")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines.append(f"# Sampling: {params_source}; num_ctx is the context window in tokens.")
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def create_command(name: str, modelfile: str, quantize: str | None = None) -> str:
    """The `ollama create` line; with `quantize`, Ollama quantizes the f16 GGUF itself."""
    q = f" --quantize {quantize}" if quantize else ""
    return f"ollama create {name}{q} -f {modelfile}"
