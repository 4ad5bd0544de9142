"""bench.slow_reader: a streamed answer's body is read back as its text, events, usage and tokens' bytes."""

import json

from bench.slow_reader import parse_sse


def sse(*chunks: dict) -> bytes:
    return b"".join(b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


def test_text_events_usage_and_token_bytes():
    def logprobs(*tokens: str) -> dict:
        return {"content": [{"token": token, "bytes": list(token.encode())} for token in tokens]}

    body = sse({"choices": [{"delta": {"role": "assistant", "content": ""}}]},
               {"choices": [{"delta": {"content": "Hel"}, "logprobs": logprobs("H", "el")}]},
               {"choices": [{"delta": {"content": "lo"}, "logprobs": logprobs("lo")}]},
               {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})
    answer = parse_sse(body)
    assert answer.text == "Hello" and answer.events == 2 and answer.completion_tokens == 3
    assert answer.token_bytes == [b"H", b"el", b"lo"]
