"""Proto sampling parameters -> vLLM `SamplingParams`, with every limit checked and named in the error.

Token ids (stop_token_ids, allowed_token_ids, logit_bias keys) are checked against the vocabulary by vLLM's own
`SamplingParams.verify` when a request is admitted (before its images are encoded), with vLLM's message; the bad
words, by vLLM's tokenization of them. What is checked here is what bounds the work a request can ask for.
"""

import math

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from llm_svc.sampling_defaults import NO_DEFAULTS, SamplingDefaults
from llm_svc.structured_outputs import structured_outputs_from_pb
from protos import llm_pb2
from protos.errors import InvalidInput

MAX_STOP_STRINGS = 16
# OpenAI's own bound on n: each completion is a sequence of its own in the engine.
MAX_COMPLETIONS = 128
MAX_LOGPROBS = 20
# vLLM's own limit on bad words (VLLM_MAX_NUM_BAD_WORDS counts their tokenizations; this, the words).
MAX_BAD_WORDS = 128
MAX_BAD_WORD_CHARS = 256
MAX_LOGIT_BIAS_ENTRIES = 1024
# Above the largest InternVL vocabulary (Qwen3's, 151k): a longer list can only repeat ids.
MAX_ALLOWED_TOKEN_IDS = 1 << 18
# vLLM clamps each bias into this range rather than refusing it.
LOGIT_BIAS_BOUND = 100.0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidInput(message)


def _check_ranges(p: llm_pb2.SamplingParams, max_model_len: int) -> None:
    if p.HasField("n"):
        _check(1 <= p.n <= MAX_COMPLETIONS, f"n={p.n} must be in [1, {MAX_COMPLETIONS}]")
    if p.HasField("temperature"):
        _check(0.0 <= p.temperature <= 2.0, f"temperature={p.temperature:g} must be in [0, 2]")
    if p.HasField("top_p"):
        _check(0.0 < p.top_p <= 1.0, f"top_p={p.top_p:g} must be in (0, 1]")
    if p.HasField("top_k"):
        _check(p.top_k >= -1, f"top_k={p.top_k} must be -1, 0 (disabled) or positive")
    if p.HasField("min_p"):
        _check(0.0 <= p.min_p <= 1.0, f"min_p={p.min_p:g} must be in [0, 1]")
    for name in ("presence_penalty", "frequency_penalty"):
        if p.HasField(name):
            _check(-2.0 <= getattr(p, name) <= 2.0, f"{name}={getattr(p, name):g} must be in [-2, 2]")
    if p.HasField("repetition_penalty"):
        _check(0.0 < p.repetition_penalty <= 2.0, f"repetition_penalty={p.repetition_penalty:g} must be in (0, 2]")
    if p.HasField("max_tokens"):
        _check(1 <= p.max_tokens <= max_model_len,
               f"max_tokens={p.max_tokens} must be in [1, {max_model_len}] (the context length)")
    _check(p.min_tokens <= (p.max_tokens if p.HasField("max_tokens") else max_model_len),
           f"min_tokens={p.min_tokens} must be at most max_tokens (or the context length, {max_model_len})")
    if p.HasField("logprobs"):
        _check(p.logprobs <= MAX_LOGPROBS, f"logprobs={p.logprobs}: at most {MAX_LOGPROBS} alternatives")
    # Above the limit (-1 included: the whole vocabulary) vLLM's engine refuses it with its own message.
    if p.HasField("prompt_logprobs"):
        _check(p.prompt_logprobs >= -1, "`prompt_logprobs` must be a positive value or -1.")


def _check_lists(p: llm_pb2.SamplingParams) -> None:
    _check(len(p.stop) <= MAX_STOP_STRINGS, f"{len(p.stop)} stop strings; the limit is {MAX_STOP_STRINGS}")
    _check(all(s for s in p.stop), "stop strings must not be empty")
    _check(len(p.bad_words) <= MAX_BAD_WORDS, f"{len(p.bad_words)} bad_words; the limit is {MAX_BAD_WORDS}")
    _check(all(0 < len(w) <= MAX_BAD_WORD_CHARS for w in p.bad_words),
           f"bad_words must be non-empty and at most {MAX_BAD_WORD_CHARS} characters each")
    _check(len(p.allowed_token_ids) <= MAX_ALLOWED_TOKEN_IDS,
           f"{len(p.allowed_token_ids)} allowed_token_ids; the limit is {MAX_ALLOWED_TOKEN_IDS}")
    _check(len(p.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES,
           f"{len(p.logit_bias)} logit_bias entries; the limit is {MAX_LOGIT_BIAS_ENTRIES}")
    # An infinite bias is clamped like any other (a JSON number beyond float32 arrives as one); NaN is no number.
    _check(not any(math.isnan(bias) for bias in p.logit_bias.values()), "logit_bias values must be numbers, not NaN")


def _clamped_logit_bias(p: llm_pb2.SamplingParams) -> dict[int, float] | None:
    return {token: min(LOGIT_BIAS_BOUND, max(-LOGIT_BIAS_BOUND, bias))
            for token, bias in p.logit_bias.items()} or None


def _optional(p: llm_pb2.SamplingParams, name: str, default):
    return getattr(p, name) if p.HasField(name) else default


def to_sampling_params(p: llm_pb2.SamplingParams, max_model_len: int,
                       defaults: SamplingDefaults | None = None) -> SamplingParams:
    """Unset fields take the server's `defaults` (the generation config's), else vLLM's neutral values. Unset
    max_tokens without a default means "up to the end of the context", which the engine works out per prompt."""
    _check_ranges(p, max_model_len)
    _check_lists(p)
    defaults = defaults or NO_DEFAULTS
    return SamplingParams(
        n=_optional(p, "n", 1),
        **defaults.sampling_fields(p),
        seed=_optional(p, "seed", None),
        stop=list(p.stop) or None,
        stop_token_ids=list(p.stop_token_ids) or None,
        ignore_eos=p.ignore_eos,
        max_tokens=defaults.max_tokens(_optional(p, "max_tokens", None)),
        min_tokens=p.min_tokens,
        logprobs=_optional(p, "logprobs", None),
        prompt_logprobs=_optional(p, "prompt_logprobs", None),
        bad_words=list(p.bad_words) or None,
        allowed_token_ids=list(p.allowed_token_ids) or None,
        logit_bias=_clamped_logit_bias(p),
        include_stop_str_in_output=p.include_stop_str_in_output,
        skip_special_tokens=_optional(p, "skip_special_tokens", True),
        spaces_between_special_tokens=_optional(p, "spaces_between_special_tokens", True),
        structured_outputs=(structured_outputs_from_pb(p.structured_outputs)
                            if p.HasField("structured_outputs") else None),
        # Deltas, not the cumulative text: each stream message carries only what is new.
        output_kind=RequestOutputKind.DELTA,
    )
