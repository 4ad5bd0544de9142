"""Proto sampling parameters -> vLLM `SamplingParams`, with every limit checked and named in the error."""

from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind

from protos import llm_pb2
from protos.errors import InvalidInput

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidInput(message)


def to_sampling_params(p: llm_pb2.SamplingParams, max_model_len: int) -> SamplingParams:
    """Unset max_tokens means "up to the end of the context", which the engine works out per prompt."""
    _check(not p.HasField("n") or p.n == 1, f"n={p.n}: only n=1 is supported")
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
    if p.HasField("logprobs"):
        _check(p.logprobs <= MAX_LOGPROBS, f"logprobs={p.logprobs}: at most {MAX_LOGPROBS} alternatives")
    _check(len(p.stop) <= MAX_STOP_STRINGS, f"{len(p.stop)} stop strings; the limit is {MAX_STOP_STRINGS}")
    _check(all(s for s in p.stop), "stop strings must not be empty")

    return SamplingParams(
        n=1,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.HasField("top_k") else 0,
        min_p=p.min_p if p.HasField("min_p") else 0.0,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop=list(p.stop) or None,
        stop_token_ids=list(p.stop_token_ids) or None,
        ignore_eos=p.ignore_eos,
        max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        # Deltas, not the cumulative text: each stream message carries only what is new.
        output_kind=RequestOutputKind.DELTA,
    )
