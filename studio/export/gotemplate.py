"""A small Go `text/template` renderer: enough of it to run the TEMPLATE a Modelfile carries.

Ollama renders prompts with Go's text/template. The export checks the TEMPLATE it writes by
running that very text here, on the data Ollama passes (`.System`, `.Messages` with `.Role`
and `.Content`), and comparing with the model's own Jinja chat template. Supported: text,
`{{ pipeline }}`, `{{ if }}` / `{{ else if }}` / `{{ else }}` / `{{ end }}`, `{{ range $i, $x
:= pipeline }}`, variable declaration (`:=`) and assignment (`=`, reaching the enclosing
scope as in Go), fields (`.X`, `$.X`, `$x.X`), string and integer literals, parentheses and
the functions eq, ne, not, and, or, len, slice. Trim markers (`{{-`, `-}}`) are honoured.
Anything else raises GoTemplateError rather than rendering something Go would not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any


class GoTemplateError(ValueError):
    """The template uses something this renderer does not support, or is malformed."""


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+)')


@dataclass
class _Node:
    kind: str  # text, out, if, range, set
    text: str = ""
    expr: list[Any] = field(default_factory=list)
    var: str = ""
    index_var: str = ""
    declare: bool = False
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


def _lex(template: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) pieces, with Go's trim markers applied."""
    out: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if m.group(1):
            text = text.rstrip()
        if out and out[-1][0] == "trim":
            out.pop()
            text = text.lstrip()
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        if m.group(3):
            out.append(("trim", ""))
        pos = m.end()
    tail = template[pos:]
    if out and out[-1][0] == "trim":
        out.pop()
        tail = tail.lstrip()
    out.append(("text", tail))
    return [p for p in out if p != ("text", "")]


def _parse_expr(tokens: list[str]) -> list[Any]:
    """Tokens of one command into a nested list (parenthesised sub-commands become lists)."""
    stack: list[list[Any]] = [[]]
    for t in tokens:
        if t == "(":
            stack.append([])
        elif t == ")":
            if len(stack) == 1:
                raise GoTemplateError("unbalanced ')'")
            inner = stack.pop()
            stack[-1].append(inner)
        else:
            stack[-1].append(t)
    if len(stack) != 1:
        raise GoTemplateError("unbalanced '('")
    return stack[0]


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def parse(template: str) -> list[_Node]:
    """The template as a tree of nodes; GoTemplateError on what is not supported."""
    pieces = _lex(template)
    nodes, rest = _parse_block(pieces, 0, top=True)
    if rest != len(pieces):
        raise GoTemplateError("unexpected {{ end }} or {{ else }}")
    return nodes


def _parse_block(pieces: list[tuple[str, str]], i: int, top: bool = False) -> tuple[list, int]:
    """Nodes until a matching end/else (left for the caller), or the end of the template."""
    nodes: list[_Node] = []
    while i < len(pieces):
        kind, text = pieces[i]
        if kind == "text":
            nodes.append(_Node("text", text=text))
            i += 1
            continue
        word = text.split(None, 1)[0] if text else ""
        if word in ("end", "else"):
            if top:
                raise GoTemplateError(f"unexpected {{{{ {text} }}}}")
            return nodes, i
        if word == "if":
            node, i = _parse_if(pieces, i, text[2:])
        elif word == "range":
            node, i = _parse_range(pieces, i, text[5:])
        else:
            node, i = _parse_simple(text), i + 1
        nodes.append(node)
    if not top:
        raise GoTemplateError("missing {{ end }}")
    return nodes, i


def _parse_if(pieces: list[tuple[str, str]], i: int, cond: str) -> tuple[_Node, int]:
    node = _Node("if", expr=_parse_expr(_tokens(cond)))
    node.body, i = _parse_block(pieces, i + 1)
    text = pieces[i][1]
    if text.startswith("else if"):  # sugar for {{ else }}{{ if ... }}...{{ end }}{{ end }}
        nested, i = _parse_if(pieces, i, text[len("else if") :])
        node.orelse = [nested]
        return node, i
    if text == "else":
        node.orelse, i = _parse_block(pieces, i + 1)
        text = pieces[i][1]
    if text != "end":
        raise GoTemplateError(f"expected {{{{ end }}}}, got {{{{ {text} }}}}")
    return node, i + 1


def _parse_range(pieces: list[tuple[str, str]], i: int, head: str) -> tuple[_Node, int]:
    m = re.fullmatch(r"\s*(\$\w*)\s*,\s*(\$\w*)\s*:=\s*(.+)", head, re.S)
    m1 = None if m else re.fullmatch(r"\s*(\$\w*)\s*:=\s*(.+)", head, re.S)
    if m:
        node = _Node("range", index_var=m.group(1), var=m.group(2))
        node.expr = _parse_expr(_tokens(m.group(3)))
    elif m1:
        node = _Node("range", var=m1.group(1), expr=_parse_expr(_tokens(m1.group(2))))
    else:
        node = _Node("range", expr=_parse_expr(_tokens(head)))
    node.body, i = _parse_block(pieces, i + 1)
    if pieces[i][1] != "end":
        raise GoTemplateError("{{ else }} inside range is not supported")
    return node, i + 1


def _parse_simple(text: str) -> _Node:
    m = re.fullmatch(r"(\$\w+)\s*(:=|=)\s*(.+)", text, re.S)
    if m:
        expr = _parse_expr(_tokens(m.group(3)))
        return _Node("set", var=m.group(1), declare=m.group(2) == ":=", expr=expr)
    if text.startswith(("define", "template", "block", "with", "break", "continue")):
        raise GoTemplateError(f"{{{{ {text} }}}} is not supported")
    return _Node("out", expr=_parse_expr(_tokens(text)))


# --------------------------------------------------------------------------- evaluation


def _truth(value: Any) -> bool:
    """Go's truth: false, 0, nil and empty strings, lists and maps are false."""
    return bool(value)


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        if name not in obj:
            raise GoTemplateError(f"no field {name}")
        return obj[name]
    raise GoTemplateError(f"cannot read .{name} of {type(obj).__name__}")


def _operand(tok: Any, dot: Any, scopes: list[dict[str, Any]]) -> Any:
    if isinstance(tok, list):
        return _call(tok, dot, scopes)
    if tok.startswith('"'):
        return json.loads(tok)  # Go's escapes in a "..." literal are JSON's
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if tok in ("true", "false"):
        return tok == "true"
    if tok == ".":
        return dot
    head, *fields = tok.split(".")
    if head == "":
        value = dot
    else:
        value = next((s[head] for s in reversed(scopes) if head in s), None)
        if not any(head in s for s in scopes):
            raise GoTemplateError(f"undefined variable {head}")
    for name in fields:
        value = _field(value, name)
    return value


_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "len": len,
    "slice": lambda x, i=0, j=None: x[i:j],  # Go: slice x i is x[i:], not Python's slice(i)
}


def _call(cmd: list[Any], dot: Any, scopes: list[dict[str, Any]]) -> Any:
    if not cmd:
        raise GoTemplateError("empty command")
    head = cmd[0]
    if isinstance(head, str) and head in ("and", "or"):
        value: Any = None
        for arg in cmd[1:]:  # Go evaluates and/or lazily, returning the deciding operand
            value = _operand(arg, dot, scopes)
            if _truth(value) != (head == "and"):
                return value
        return value
    if isinstance(head, str) and head in _FUNCS:
        return _FUNCS[head](*[_operand(a, dot, scopes) for a in cmd[1:]])
    if len(cmd) != 1:
        raise GoTemplateError(f"unsupported function {head!r}")
    return _operand(head, dot, scopes)


def _run(nodes: list[_Node], dot: Any, scopes: list[dict[str, Any]], out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "out":
            value = _call(node.expr, dot, scopes)
            out.append("" if value is None else str(value))
        elif node.kind == "set":
            value = _call(node.expr, dot, scopes)
            if node.declare:
                scopes[-1][node.var] = value
            else:
                owner = next((s for s in reversed(scopes) if node.var in s), None)
                if owner is None:
                    raise GoTemplateError(f"assignment to undeclared {node.var}")
                owner[node.var] = value
        elif node.kind == "if":
            branch = node.body if _truth(_call(node.expr, dot, scopes)) else node.orelse
            _run(branch, dot, [*scopes, {}], out)
        elif node.kind == "range":
            for i, item in enumerate(_call(node.expr, dot, scopes) or []):
                scope = {node.var: item} if node.var else {}
                if node.index_var:
                    scope[node.index_var] = i
                _run(node.body, item, [*scopes, scope], out)


def render(template: str, data: dict[str, Any]) -> str:
    """Execute a Go template on `data` (its root, also `$`)."""
    out: list[str] = []
    _run(parse(template), data, [{"$": data}], out)
    return "".join(out)


def ollama_data(messages: list[dict[str, str]], system: str | None) -> dict[str, Any]:
    """What Ollama's chat endpoint passes to a TEMPLATE.

    Its handler puts the Modelfile's SYSTEM first when the chat has no system message; its
    template code then joins all system messages with blank lines into .System and passes
    every message as .Messages, merging consecutive messages of one role the same way.
    """
    msgs = [dict(m) for m in messages]
    if system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    sys_text = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    collated: list[dict[str, str]] = []
    for m in msgs:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"System": sys_text, "Messages": collated, "Prompt": "", "Response": ""}
