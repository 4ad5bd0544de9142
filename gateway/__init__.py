"""The OpenAI-compatible HTTP gateway: validates requests, loads image bytes and forwards one gRPC Generate
call per request to the language service (llm_svc), streaming its tokens back. It never holds tensors.
"""
