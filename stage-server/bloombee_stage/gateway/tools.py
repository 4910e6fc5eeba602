"""Tools (function calling) for a model whose chat template has no tool section (SmolLM2's).

The tools are described to the model in a system message (``TOOLS_PREAMBLE`` and each tool's
JSON schema), and a call is one JSON object on its own, ``{"name": ..., "arguments": {...}}``.
``tool_choice: "required"`` or a named function makes that object the answer's grammar (the last
stage enforces it, ``model/grammar.py``), so a call always parses and its arguments follow the
tool's schema; with ``"auto"`` the model may answer in text, and an answer that is such an object
naming a tool becomes a tool call. Earlier calls and tool results in the conversation are
rendered back the same way (an assistant message holding the call's JSON, a ``tool`` message
holding the result).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from bloombee_stage.wire.messages import Grammar

TOOLS_PREAMBLE = (
    "You can call these tools. To call one, answer with only a JSON object "
    '{"name": <tool name>, "arguments": <arguments as the tool\'s parameters describe>} and nothing else. '
    "Otherwise answer normally.\nTools:\n"
)


def tool_system_message(tools: list[dict[str, Any]]) -> str:
    described = [json.dumps({"name": tool["name"], "description": tool.get("description", ""),
                             "parameters": tool.get("parameters", {})}) for tool in tools]  # fmt: skip
    return TOOLS_PREAMBLE + "\n".join(described)


def with_tools(conversation: list[dict[str, str]], tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation with the tools described in its system message (a new one when it has none)."""
    described = tool_system_message(tools)
    if conversation and conversation[0]["role"] in ("system", "developer"):
        first = conversation[0]
        return [{"role": first["role"], "content": f"{first['content']}\n\n{described}"}, *conversation[1:]]
    return [{"role": "system", "content": described}, *conversation]


def call_text(name: str, arguments: str | dict[str, Any]) -> str:
    """An earlier call as the model would have written it."""
    parsed = json.loads(arguments) if isinstance(arguments, str) and arguments.strip() else arguments or {}
    return json.dumps({"name": name, "arguments": parsed})


def call_grammar(tools: list[dict[str, Any]], layout: dict[str, Any]) -> Grammar:
    """A call to one of ``tools`` with arguments that follow its parameters, as a JSON schema."""
    options = [{"type": "object", "properties": {"name": {"const": tool["name"]},
                                                 "arguments": tool.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False} for tool in tools]  # fmt: skip
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return Grammar(kind="json_schema", text=json.dumps({**schema, "x-guidance": layout}))


def parse_call(text: str, tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The tool call an answer is (OpenAI's ``tool_calls`` entry), or None when it is text."""
    try:
        call = json.loads(text.strip())
    except ValueError:
        return None
    names = {tool["name"] for tool in tools}
    if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}  # fmt: skip
