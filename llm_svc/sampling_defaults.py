"""The server's sampling defaults: what a request's unset sampling fields take, as vLLM's OpenAI server fills them.

They come from vLLM's `--generation-config` (an engine argument, passed through): `auto`, vLLM's default, takes the
sampling fields of the checkpoint's generation_config.json (temperature, top_p, top_k, min_p, the repetition,
presence and frequency penalties, max_new_tokens as max_tokens); `vllm` takes none; a folder takes those of the
generation_config.json in it, and its max_new_tokens then also caps every request's max_tokens.
`--override-generation-config` is laid over any of them (its max_new_tokens a cap too). vLLM's own
`ModelConfig.get_diff_sampling_param` reads them, so both servers take the same values from the same flags.

Precedence, field by field, as vLLM's request models apply it: the request's value, else the server's default, else
vLLM's neutral value. So the gateway must leave a field unset on the wire, never fill it with a neutral value.
"""

import dataclasses

from protos import llm_pb2

# The neutral values of vLLM's request models (their `_DEFAULT_SAMPLING_PARAMS`), where neither the request nor the
# server's defaults say.
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
           "presence_penalty": 0.0, "frequency_penalty": 0.0}


@dataclasses.dataclass(frozen=True)
class SamplingDefaults:
    # vLLM's names: those of NEUTRAL, and max_tokens (the request's when set, else this; unset: to the context's end).
    values: dict = dataclasses.field(default_factory=dict)
    # Above every request's max_tokens, its own included (vLLM's `override_max_tokens`).
    max_tokens_cap: int | None = None

    def __post_init__(self):
        unknown = set(self.values) - set(NEUTRAL) - {"max_tokens"}
        assert not unknown, f"not sampling defaults: {sorted(unknown)}"

    @classmethod
    def from_model_config(cls, model_config) -> "SamplingDefaults":
        """From the engine's `vllm.config.ModelConfig`, read as vLLM's chat and completion servers read it."""
        values = model_config.get_diff_sampling_param()
        if model_config.generation_config in ("auto", "vllm"):
            cap = (model_config.override_generation_config or {}).get("max_new_tokens")
        else:
            cap = values.get("max_tokens")
        return cls(dict(values), cap)

    def sampling_fields(self, p: llm_pb2.SamplingParams) -> dict:
        """The fields of NEUTRAL, each the request's, else the default, else neutral."""
        return {name: getattr(p, name) if p.HasField(name) else self.values.get(name, neutral)
                for name, neutral in NEUTRAL.items()}

    def max_tokens(self, requested: int | None) -> int | None:
        """The request's max_tokens, else the default; never above the cap. None: up to the end of the context
        (the engine stops there whatever this says, as vLLM's server takes the least of the two)."""
        chosen = requested if requested is not None else self.values.get("max_tokens")
        bounds = [bound for bound in (chosen, self.max_tokens_cap) if bound is not None]
        return min(bounds) if bounds else None


# A server started with `--generation-config vllm` and no override.
NO_DEFAULTS = SamplingDefaults()
