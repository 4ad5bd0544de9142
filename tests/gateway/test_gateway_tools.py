"""The tool fields and the parsed answer through the gateway's pure conversions (gateway/tools.py, translate.py)."""

import json

import pytest

from gateway import translate
from gateway.schemas import ChatCompletionRequest
from gateway.tools import parsed_delta_json, tools_to_proto
from protos import llm_pb2
from protos.errors import InvalidInput

META = translate.ResponseMeta("chatcmpl-1", 0, "m")
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"n": {
    "type": "integer", "maximum": 3}}}}}


def test_tools_travel_as_the_json_sent_and_a_named_choice_as_its_name():
    tools = tools_to_proto([TOOL], {"type": "function", "function": {"name": "f"}}, False)
    assert json.loads(tools.definitions_json) == [TOOL] and tools.function_name == "f"
    assert tools.HasField("parallel_calls") and not tools.parallel_calls
    assert tools_to_proto(None, "required", None).mode == "required"
    assert tools_to_proto([], None, None).definitions_json == "[]"  # vLLM refuses an empty list: it must arrive
    assert tools_to_proto(None, None, None) is None


@pytest.mark.parametrize("choice,message", [
    ({"type": "function"}, "Invalid value for `function`: `None` in `tool_choice`!"),
    ({"type": "function", "function": {}}, "Expected field `name` in `function` in `tool_choice`!"),
    ({"type": "function", "function": {"name": ""}}, "Invalid `name` in `function`: `` in `tool_choice`!")])
def test_a_malformed_named_choice_is_refused_with_vllm_s_message(choice, message):
    with pytest.raises(InvalidInput, match=message.replace("`", ".").replace("(", ".")):
        tools_to_proto([TOOL], choice, None)


def test_history_tool_calls_and_tool_messages_reach_the_chat():
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"n\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "2"}], "tools": [TOOL]})
    chat = translate.chat_generate_request(request, [], "r", 100).chat
    assistant, tool = chat.messages[1], chat.messages[2]
    assert list(assistant.content) == [] and assistant.tool_calls[0].name == "f"
    assert tool.role == llm_pb2.ROLE_TOOL and tool.tool_call_id == "c1" and tool.content[0].text == "2"
    assert chat.tools.mode == "" and json.loads(chat.tools.definitions_json) == [TOOL]


def test_a_streamed_request_is_parsed_delta_by_delta_and_a_whole_one_at_its_end():
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert translate.chat_generate_request(ChatCompletionRequest.model_validate(body), [], "r", 100).parse_at_end
    streamed = ChatCompletionRequest.model_validate({**body, "stream": True})
    assert not translate.chat_generate_request(streamed, [], "r", 100).parse_at_end


def test_a_parsed_delta_shows_only_what_the_parser_set():
    parsed = llm_pb2.ParsedOutput(reasoning="hm", tool_calls=[
        llm_pb2.ToolCallDelta(index=0, id="chatcmpl-tool-1", name="f"), llm_pb2.ToolCallDelta(index=0, arguments="{")])
    assert parsed_delta_json(parsed) == {"reasoning": "hm", "tool_calls": [
        {"index": 0, "id": "chatcmpl-tool-1", "type": "function", "function": {"name": "f"}},
        {"index": 0, "function": {"arguments": "{"}}]}
    assert parsed_delta_json(llm_pb2.ParsedOutput(content="")) == {"content": ""}
    # vLLM's parsers set content to None on a tool call's first piece, and its server sends that null.
    first = llm_pb2.ParsedOutput(content_null=True, tool_calls=[llm_pb2.ToolCallDelta(index=0, name="f")])
    assert parsed_delta_json(first) == {"content": None, "tool_calls": [{"index": 0, "function": {"name": "f"}}]}
    assert parsed_delta_json(llm_pb2.ParsedOutput(reasoning_null=True)) == {"reasoning": None}


def test_a_held_back_delta_sends_no_chunk_but_the_last_one_always_does():
    held = llm_pb2.GenerateResponse(text="<tool_call>", parsed=llm_pb2.ParsedOutput())
    assert translate.chat_chunk(held, META, False) is None
    last = llm_pb2.GenerateResponse(text="</tool_call>", parsed=llm_pb2.ParsedOutput(),
                                    finish_reason=llm_pb2.FINISH_REASON_TOOL_CALLS)
    choice = translate.chat_chunk(last, META, False)["choices"][0]
    assert choice["delta"] == {} and choice["finish_reason"] == "tool_calls"


def test_a_whole_answer_shows_the_split_of_its_last_message_and_the_reasoning_tokens():
    messages = [llm_pb2.GenerateResponse(text="<think>a</think>"),
                llm_pb2.GenerateResponse(
                    text="b", finish_reason=llm_pb2.FINISH_REASON_TOOL_CALLS,
                    parsed=llm_pb2.ParsedOutput(reasoning="a", tool_calls=[llm_pb2.ToolCallDelta(
                        index=0, id="chatcmpl-tool-1", name="f", arguments="{}")]),
                    usage=llm_pb2.Usage(prompt_tokens=3, completion_tokens=4, reasoning_tokens=2))]
    body = translate.chat_completion(messages, META, False)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": None, "reasoning": "a", "tool_calls": [
        {"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
