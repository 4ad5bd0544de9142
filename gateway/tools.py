"""OpenAI's tool fields in and out: `tools`, `tool_choice`, `parallel_tool_calls`, the tool calls of the history, and
the parsed answer (content, reasoning, tool calls) that llm_svc sends back.

The gateway checks only the JSON's shape. Whether the tools and the choice make sense (a named function that no tool
defines, a choice without tools, `auto` on a server without --enable-auto-tool-choice) is vLLM's judgement, made in
llm_svc by vLLM's own request model, which words the 400 as vLLM's server does.
"""

import json
from typing import Any, Literal

from pydantic import BaseModel

from protos import llm_pb2
from protos.errors import InvalidInput


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


def tool_calls_to_proto(calls: list[ToolCall] | None) -> list[llm_pb2.ToolCall]:
    return [llm_pb2.ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments)
            for call in calls or []]


_CORRECT_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def _named_function(choice: dict) -> str:
    """The function a tool_choice object names; vLLM's checks, with its messages (the proto carries the name only)."""
    function = choice.get("function")
    if not isinstance(function, dict):
        raise InvalidInput(f"Invalid value for `function`: `{function}` in `tool_choice`! {_CORRECT_USAGE}")
    if "name" not in function:
        raise InvalidInput(f"Expected field `name` in `function` in `tool_choice`! {_CORRECT_USAGE}")
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"Invalid `name` in `function`: `{name}` in `tool_choice`! {_CORRECT_USAGE}")
    return name


def tools_to_proto(tools: list[Any] | None, tool_choice: str | dict | None,
                   parallel_tool_calls: bool | None) -> llm_pb2.Tools | None:
    """None when the request has none of the three fields (vLLM's defaults: no tools)."""
    if tools is None and tool_choice is None and parallel_tool_calls is None:
        return None
    message = llm_pb2.Tools(definitions_json=json.dumps(tools) if tools is not None else "")
    if isinstance(tool_choice, dict):
        message.function_name = _named_function(tool_choice)
    elif tool_choice is not None:
        message.mode = tool_choice
    if parallel_tool_calls is not None:
        message.parallel_calls = parallel_tool_calls
    return message


def tool_call_delta_json(call: llm_pb2.ToolCallDelta) -> dict:
    """A streamed piece of a tool call, with the keys vLLM's server sends: the id and type on a call's first piece."""
    out: dict = {"index": call.index}
    if call.HasField("id"):
        out.update(id=call.id, type="function")
    function = {name: getattr(call, name) for name in ("name", "arguments") if call.HasField(name)}
    if function:
        out["function"] = function
    return out


def tool_call_json(call: llm_pb2.ToolCallDelta) -> dict:
    """A whole tool call, as a non-streamed answer's message lists it."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def parsed_delta_json(parsed: llm_pb2.ParsedOutput) -> dict:
    """A chat chunk's delta from llm_svc's split of the answer: only what the split set, nulls included."""
    delta = {}
    for name in ("content", "reasoning"):
        if parsed.HasField(name):
            delta[name] = getattr(parsed, name)
        elif getattr(parsed, f"{name}_null"):
            delta[name] = None
    if parsed.tool_calls:
        delta["tool_calls"] = [tool_call_delta_json(call) for call in parsed.tool_calls]
    return delta
