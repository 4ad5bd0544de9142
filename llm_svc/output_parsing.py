"""A chat's answer split into content, reasoning and tool calls by vLLM's own parsers, as vLLM's OpenAI server splits it.

The split happens here rather than in the gateway: it needs the tokenizer and vLLM's parser classes (chosen by the
same flags as vLLM's server: --reasoning-parser, --enable-auto-tool-choice, --tool-call-parser), and a gRPC client
then gets what an HTTP client gets. vLLM's parsers read a vLLM `ChatCompletionRequest`, so one is built from the
request's tool fields: vLLM's validators refuse what vLLM's server refuses, with its messages, and the parser's
`adjust_request` picks what vLLM's server picks (the constraint that forces a required or named tool call: with
VLLM_ENFORCE_STRICT_TOOL_CALLING, vLLM's default, the parser's structural tag where it has one, e.g. hermes, else the
JSON schema of the call; special tokens kept for the parser to see). The branches that turn a parse into an answer
follow vLLM's `serving.py`.
"""

import dataclasses
import json
from collections.abc import Sequence

import pydantic
from vllm.entrypoints.openai.chat_completion.protocol import (ChatCompletionNamedToolChoiceParam, ChatCompletionRequest,
                                                              ChatCompletionToolsParam)
from vllm.parser import ParserManager
from vllm.renderers.chat_utils import make_tool_call_id

from llm_svc.vllm_messages import client_message
from protos import llm_pb2
from protos.errors import InvalidInput


@dataclasses.dataclass(frozen=True)
class ParserFlags:
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False


@dataclasses.dataclass(frozen=True)
class ToolRequest:
    """OpenAI's tool fields; None where the request leaves them out (vLLM's defaults apply)."""

    definitions: list | None = None
    choice: str | dict | None = None
    parallel_calls: bool | None = None


def tools_from_pb(tools: llm_pb2.Tools) -> ToolRequest:
    try:
        definitions = json.loads(tools.definitions_json) if tools.definitions_json else None
    except (ValueError, RecursionError) as error:
        raise InvalidInput(f"tools is not valid JSON: {error}") from None
    kind = tools.WhichOneof("choice")
    choice = ({"type": "function", "function": {"name": tools.function_name}} if kind == "function_name"
              else tools.mode if kind == "mode" else None)
    return ToolRequest(definitions, choice,
                       tools.parallel_calls if tools.HasField("parallel_calls") else None)


@dataclasses.dataclass
class ParsedOutput:
    content: str | None = None
    reasoning: str | None = None
    # (index, id, name, arguments), each but the index None where a streamed piece leaves it out.
    tool_calls: list[tuple[int, str | None, str | None, str | None]] = dataclasses.field(default_factory=list)
    # Streamed: the parser set the field to None rather than leaving it out; vLLM's server sends it as null.
    content_null: bool = False
    reasoning_null: bool = False


class ChoiceParser:
    """Parses one completion of a request (vLLM's parsers keep state: one per completion)."""

    def __init__(self, parser, request: ChatCompletionRequest, enable_auto_tools: bool):
        self._parser = parser
        self._request = request
        self._enable_auto_tools = enable_auto_tools
        self._token_ids: list[int] = []
        self._streamed_tool_calls = False

    @property
    def token_count(self) -> int:
        return len(self._token_ids)

    @property
    def _named(self) -> bool:
        return type(self._request.tool_choice) is ChatCompletionNamedToolChoiceParam

    @property
    def _parallel(self) -> bool:
        return self._request.parallel_tool_calls is not False

    def delta(self, text: str, token_ids: Sequence[int], prompt_token_ids: list[int] | None,
              finished: bool) -> ParsedOutput | None:
        """This message's share of the answer; None where the parser holds the text back."""
        self._token_ids.extend(token_ids)
        message = self._parser.parse_delta(delta_text=text, delta_token_ids=list(token_ids), request=self._request,
                                           prompt_token_ids=prompt_token_ids, finished=finished)
        if message is None:
            return None
        self._streamed_tool_calls |= bool(message.tool_calls)
        calls = [(c.index, c.id, c.function.name if c.function else None, c.function.arguments if c.function else None)
                 for c in message.tool_calls if self._parallel or c.index == 0]
        explicit = message.model_fields_set  # vLLM's server dumps the delta with exclude_unset
        return ParsedOutput(message.content, message.reasoning, calls,
                            content_null=message.content is None and "content" in explicit,
                            reasoning_null=message.reasoning is None and "reasoning" in explicit)

    def streamed_finish_reason(self, finish_reason: str) -> str:
        # vLLM's streaming path: "tool_calls" once a call streamed, unless the call was a named function's.
        return "tool_calls" if self._streamed_tool_calls and not self._named and finish_reason == "stop" \
            else finish_reason

    def whole(self, text: str, token_ids: Sequence[int], prompt_token_ids: list[int] | None,
              finish_reason: str) -> tuple[ParsedOutput, str]:
        """The whole answer parsed at once, and its finish reason (vLLM's non-streaming path)."""
        self._token_ids.extend(token_ids)
        if prompt_token_ids is not None:
            self._parser.set_prompt_token_ids(prompt_token_ids)
        reasoning, content, calls = self._parser.parse(text, self._request, enable_auto_tools=self._enable_auto_tools,
                                                       model_output_token_ids=self._token_ids)
        request, tool_parser = self._request, self._parser.tool_parser
        required = request.tool_choice == "required"
        tool_calls, auto_called = [], False
        if self._named or required:
            content, tool_calls = content or "", calls or []
        elif (request.tools and request.tool_choice in ("auto", None) and self._enable_auto_tools
              and tool_parser is not None):
            tool_calls = calls or []
            auto_called = bool(tool_calls)
        if not self._parallel:
            tool_calls = tool_calls[:1]
        parsed = ParsedOutput(content, reasoning, [(i, call.id or make_tool_call_id(), call.name, call.arguments)
                                                   for i, call in enumerate(tool_calls)])
        if auto_called or (required and finish_reason == "stop"):
            finish_reason = "tool_calls"
        return parsed, finish_reason

    def reasoning_tokens(self) -> int:
        return self._parser.count_reasoning_tokens(tuple(self._token_ids))


@dataclasses.dataclass(frozen=True)
class ChatParsing:
    """What the parsers decided for one chat request: what the template and the engine get, and a parser per
    completion."""

    request: ChatCompletionRequest  # vLLM's, after the parser's adjust_request
    template_tools: list[dict] | None
    parser_cls: type | None
    enable_auto_tools: bool
    counts_reasoning: bool  # the usage reports reasoning tokens (a reasoning parser is set)
    template_kwargs: dict

    def choice_parser(self, tokenizer, model_config) -> ChoiceParser | None:
        if self.parser_cls is None:
            return None
        parser = self.parser_cls(tokenizer, self.request.tools, chat_template_kwargs=self.template_kwargs,
                                 model_config=model_config)
        return ChoiceParser(parser, self.request, self.enable_auto_tools)

    def engine_kwargs(self, tokenizer, model_config, prompt_token_ids: list[int]) -> dict:
        """`reasoning_ended` and `reasoning_parser_kwargs` for the engine, as vLLM's server passes them: they decide
        from which token a structured-output constraint applies."""
        parser = self.choice_parser(tokenizer, model_config)
        parser = parser._parser if parser is not None else None
        reasoning_kwargs = ({"chat_template_kwargs": self.template_kwargs}
                            if parser is not None and parser.reasoning_parser is not None else None)
        return {"reasoning_ended": self.request.resolve_reasoning_ended(parser, prompt_token_ids),
                "reasoning_parser_kwargs": reasoning_kwargs}


class OutputParsers:
    """The server's parser class, chosen once from its flags, and the per-request decisions it makes."""

    def __init__(self, flags: ParserFlags, tokenizer, model_config):
        self.flags = flags
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.parser_cls = ParserManager.get_parser(
            tool_parser_name=flags.tool_call_parser, reasoning_parser_name=flags.reasoning_parser,
            enable_auto_tools=flags.enable_auto_tool_choice, model_name=model_config.model, is_harmony=False,
            tokenizer=tokenizer)

    def plan(self, messages: list[dict], tools: ToolRequest, template_kwargs: dict, structured_outputs,
             skip_special_tokens: bool) -> ChatParsing:
        """`messages`: the chat as text (the request object is for parsing only: some parsers number tool call ids
        by the calls in the history)."""
        request = self._vllm_request(messages, tools, template_kwargs, structured_outputs, skip_special_tokens)
        self._check_tool_choice(request)
        parser_cls = self.parser_cls
        if parser_cls is not None and (parser_cls.always_adjust_request or parser_cls.reasoning_parser_cls is not None
                                       or request.tool_choice != "none"):
            request = parser_cls(self.tokenizer, request.tools, model_config=self.model_config,
                                 chat_template_kwargs=template_kwargs).adjust_request(request=request)
        template_tools = [tool.model_dump() for tool in request.tools] if request.tools is not None else None
        return ChatParsing(request, template_tools, parser_cls, self.flags.enable_auto_tool_choice,
                           bool(self.flags.reasoning_parser) and parser_cls is not None, template_kwargs)

    @staticmethod
    def _vllm_request(messages: list[dict], tools: ToolRequest, template_kwargs: dict, structured_outputs,
                      skip_special_tokens: bool) -> ChatCompletionRequest:
        fields = {"messages": messages, "chat_template_kwargs": template_kwargs or None,
                  "structured_outputs": structured_outputs, "skip_special_tokens": skip_special_tokens}
        # Left out when unset, so that vLLM's validators apply its defaults (tool_choice "auto" with tools).
        for name, value in (("tools", tools.definitions), ("tool_choice", tools.choice),
                            ("parallel_tool_calls", tools.parallel_calls)):
            if value is not None:
                fields[name] = value
        try:
            return ChatCompletionRequest.model_validate(fields)
        except pydantic.ValidationError as error:
            raise InvalidInput(_validation_message(error)) from None
        except (TypeError, KeyError):  # vLLM's check of tool_choice reads the tools before their shape is checked
            raise InvalidInput(_tools_shape_message(fields.get("tools"))) from None

    def _check_tool_choice(self, request: ChatCompletionRequest) -> None:
        # vLLM's OnlineRenderer.render_chat, with its messages.
        if self.parser_cls is not None and self.parser_cls.tool_parser_cls is not None:
            return
        if request.tool_choice in (None, "none"):
            return
        if request.tool_choice == "auto":
            if not self.flags.enable_auto_tool_choice:
                raise InvalidInput('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to '
                                   'be set')
            return
        described = (f'function "{request.tool_choice.function.name}"'
                     if isinstance(request.tool_choice, ChatCompletionNamedToolChoiceParam)
                     else f'"{request.tool_choice}"')
        raise InvalidInput(f"tool_choice={described} requires --tool-call-parser to be set")


_TOOLS = pydantic.TypeAdapter(list[ChatCompletionToolsParam])


def _tools_shape_message(tools) -> str:
    """What is wrong with the shape of `tools` (OpenAI's list of functions), in pydantic's words."""
    try:
        _TOOLS.validate_python(tools)
    except pydantic.ValidationError as error:
        return _validation_message(error, field="tools")
    return "tools: not a list of functions"


def _validation_message(error: pydantic.ValidationError, field: str | None = None) -> str:
    """The message of vLLM's own check where one failed (its server sends that text), else pydantic's; `field`: the
    name of the value validated, where it is a request's field."""
    first = error.errors(include_url=False)[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, Exception):
        return client_message(cause)
    where = ".".join(str(part) for part in ([field] if field else []) + list(first["loc"]))
    return f"{where}: {first['msg']}" if where else first["msg"]
