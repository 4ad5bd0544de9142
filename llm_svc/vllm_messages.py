"""vLLM's refusals as vLLM's OpenAI server words them for the client."""

from vllm.entrypoints.serve.exception_handling.utils import sanitize_message


def client_message(error: Exception) -> str:
    """The error's text as vLLM's server sends it: stripped (a grammar error ends in a newline), without file
    paths, tracebacks or memory addresses."""
    return sanitize_message(str(error))
