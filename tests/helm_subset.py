"""Renders the chart's templates for the tests: the small part of Helm's template language the
chart uses, and nothing more (no helm binary can be installed here).

Supported: ``{{ .Values.a.b }}``, ``.Release.Name``, ``.Release.Namespace``, ``.Chart.AppVersion``,
pipelines through ``quote``, ``toYaml`` and ``nindent N``, ``{{- if X }} ... {{- else }} ... {{- end }}``
(X a value, or ``or`` of values), and the ``{{-`` / ``-}}`` whitespace trimming. A template that
uses anything else fails here, which keeps the chart inside what this renderer checks; `helm
template` on a machine with helm is the full check.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

TAG = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


class TemplateError(ValueError):
    pass


def _lookup(path: str, context: dict) -> Any:
    value: Any = context
    for part in path.lstrip(".").split("."):
        if not isinstance(value, dict) or part not in value:
            raise TemplateError(f"{path}: no such value")
        value = value[part]
    return value


def _evaluate(expression: str, context: dict) -> Any:
    stages = [stage.strip().split() for stage in expression.split("|")]
    head = stages[0]
    if head[0] == "toYaml" and len(head) == 2:
        value: Any = _yaml(_lookup(head[1], context))
    elif head[0] == "or" and len(head) > 2 and all(arg.startswith(".") for arg in head[1:]):
        values = [_lookup(arg, context) for arg in head[1:]]
        value = next((each for each in values if each), values[-1])  # Go's `or`: the first true one, or the last
    elif len(head) == 1 and head[0].startswith("."):
        value = _lookup(head[0], context)
    else:
        raise TemplateError(f"unsupported expression {expression!r}")
    for function, *args in stages[1:]:
        if function == "quote":
            value = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        elif function == "nindent" and len(args) == 1:
            pad = " " * int(args[0])
            value = "\n" + "\n".join(pad + line if line else line for line in str(value).splitlines())
        elif function == "toYaml":
            value = _yaml(value)
        else:
            raise TemplateError(f"unsupported function {function!r} in {expression!r}")
    return value


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=False).rstrip("\n") if value else "{}"


def render(text: str, context: dict) -> str:
    out: list[str] = []
    stack: list[bool] = []  # per open `if`: is this branch emitted
    position = 0
    for match in TAG.finditer(text):
        literal = text[position : match.start()]
        if match.group(1):
            literal = literal.rstrip()
        if all(stack):
            out.append(literal)
        position = match.end()
        if match.group(3):
            while position < len(text) and text[position].isspace():
                position += 1
        words = match.group(2).split(maxsplit=1)
        if words[0] == "if":
            stack.append(all(stack) and bool(_evaluate(words[1], context)))
        elif words[0] == "else":
            stack[-1] = not stack[-1] and all(stack[:-1])
        elif words[0] == "end":
            stack.pop()
        elif all(stack):
            out.append(str(_evaluate(match.group(2), context)))
    if stack:
        raise TemplateError("an `if` without its `end`")
    out.append(text[position:])
    return "".join(out)
