"""The server's sampling defaults (vLLM's --generation-config): read from the checkpoint as vLLM reads them, and
applied to the fields a request leaves unset with vLLM's precedence (the request's value, else the default, else
vLLM's neutral value), field by field as vLLM's own request models apply them."""

import json
import pathlib

import pytest
from vllm.config import ModelConfig
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest
from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

from llm_svc.config import parse_config
from llm_svc.sampling import to_sampling_params
from llm_svc.sampling_defaults import NEUTRAL, NO_DEFAULTS, SamplingDefaults
from llm_svc.servicer import input_from_pb
from protos import llm_pb2

MAX_MODEL_LEN = 128
# The sampling fields of a real checkpoint's generation_config.json (Qwen3's, but for the penalty and the length).
SAMPLING_FIELDS = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.3,
                   "max_new_tokens": 7}
# The same, as vLLM names them.
CHECKPOINT_DEFAULTS = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "repetition_penalty": 1.3, "max_tokens": 7}


@pytest.fixture(scope="module")
def plain_checkpoint(tiny_checkpoint) -> pathlib.Path:
    return tiny_checkpoint(layout="hf", llm="dense")


@pytest.fixture(scope="module")
def checkpoint_with_defaults(plain_checkpoint, tmp_path_factory) -> pathlib.Path:
    """The tiny checkpoint with sampling fields in its generation_config.json: a linked copy, since every other test
    pins what the shared checkpoint writes."""
    out = tmp_path_factory.mktemp("checkpoint-with-defaults")
    for file in plain_checkpoint.iterdir():
        if file.name != "generation_config.json":
            (out / file.name).symlink_to(file.resolve())
    config = json.loads((plain_checkpoint / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**config, **SAMPLING_FIELDS}))
    return out


@pytest.fixture(scope="module")
def generation_config_folder(tmp_path_factory) -> pathlib.Path:
    """A folder holding only a generation_config.json, for `--generation-config FOLDER`."""
    out = tmp_path_factory.mktemp("generation-config")
    (out / "generation_config.json").write_text(json.dumps(SAMPLING_FIELDS))
    return out


def model_config(checkpoint: pathlib.Path, **flags) -> ModelConfig:
    return ModelConfig(model=str(checkpoint), dtype="float32", max_model_len=MAX_MODEL_LEN, **flags)


# ---- read as vLLM reads them ------------------------------------------------------------------------------

def test_auto_takes_the_checkpoint_s_sampling_fields(checkpoint_with_defaults):
    defaults = SamplingDefaults.from_model_config(model_config(checkpoint_with_defaults))
    assert defaults == SamplingDefaults(CHECKPOINT_DEFAULTS, max_tokens_cap=None)


def test_a_checkpoint_without_sampling_fields_has_no_defaults(plain_checkpoint):
    assert SamplingDefaults.from_model_config(model_config(plain_checkpoint)) == NO_DEFAULTS


def test_vllm_ignores_the_checkpoint_s(checkpoint_with_defaults):
    config = model_config(checkpoint_with_defaults, generation_config="vllm")
    assert SamplingDefaults.from_model_config(config) == NO_DEFAULTS


def test_a_folder_s_max_new_tokens_also_caps_every_request(plain_checkpoint, generation_config_folder):
    config = model_config(plain_checkpoint, generation_config=str(generation_config_folder))
    assert SamplingDefaults.from_model_config(config) == SamplingDefaults(CHECKPOINT_DEFAULTS, max_tokens_cap=7)


def test_the_override_is_laid_over_the_checkpoint_s(checkpoint_with_defaults):
    config = model_config(checkpoint_with_defaults, override_generation_config={"temperature": 0.1,
                                                                                "max_new_tokens": 5})
    defaults = SamplingDefaults.from_model_config(config)
    assert defaults == SamplingDefaults({**CHECKPOINT_DEFAULTS, "temperature": 0.1, "max_tokens": 5},
                                        max_tokens_cap=5)


def test_the_flags_are_vllm_s_and_reach_the_engine(generation_config_folder):
    _, engine_args = parse_config(["--vision", "localhost:1", "--generation-config", str(generation_config_folder),
                                   "--override-generation-config", '{"max_new_tokens": 5}'])
    assert engine_args.generation_config == str(generation_config_folder)
    assert engine_args.override_generation_config == {"max_new_tokens": 5}
    _, engine_args = parse_config(["--vision", "localhost:1"])
    assert engine_args.generation_config == "auto"  # vLLM's default: the checkpoint's


# ---- applied with vLLM's precedence -----------------------------------------------------------------------

DEFAULTS = SamplingDefaults(CHECKPOINT_DEFAULTS)


def convert(defaults: SamplingDefaults, **fields):
    return to_sampling_params(llm_pb2.SamplingParams(**fields), MAX_MODEL_LEN, defaults)


def test_unset_fields_take_the_defaults_and_the_rest_stay_neutral():
    params = convert(DEFAULTS)
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty, params.max_tokens) == \
        (0.6, 20, 0.95, 1.3, 7)
    assert (params.min_p, params.presence_penalty, params.frequency_penalty) == (0.0, 0.0, 0.0)


def test_the_request_s_values_win_an_explicit_neutral_one_included():
    params = convert(DEFAULTS, temperature=1.0, top_k=0, repetition_penalty=1.0, max_tokens=30)
    assert (params.temperature, params.top_k, params.repetition_penalty, params.max_tokens) == (1.0, 0, 1.0, 30)


def test_greedy_asked_for_is_greedy_whatever_the_defaults():
    params = convert(DEFAULTS, temperature=0.0)
    assert params.temperature == 0.0 and params.top_k == 0 and params.top_p == 1.0  # vLLM's greedy
    assert params.repetition_penalty == 1.3  # not a sampling knob: it still applies


@pytest.mark.parametrize("requested,default,cap,expected", [
    (None, None, None, None),  # up to the end of the context
    (None, 7, None, 7), (30, 7, None, 30), (30, 7, 10, 10), (5, 7, 10, 5), (None, None, 4, 4),
])
def test_max_tokens_is_the_request_s_else_the_default_and_never_above_the_cap(requested, default, cap, expected):
    defaults = SamplingDefaults({"max_tokens": default} if default else {}, max_tokens_cap=cap)
    assert defaults.max_tokens(requested) == expected


def test_without_defaults_the_neutral_values_are_vllm_s():
    vllm_neutral = VllmChatRequest(messages=[{"role": "user", "content": "hi"}])._DEFAULT_SAMPLING_PARAMS
    assert NEUTRAL == vllm_neutral
    assert {name: getattr(convert(NO_DEFAULTS), name) for name in NEUTRAL} == vllm_neutral
    assert convert(NO_DEFAULTS).max_tokens is None


def test_a_generate_request_takes_the_server_s_defaults():
    request = llm_pb2.GenerateRequest(prompt="hi", sampling=llm_pb2.SamplingParams(top_k=3))
    sampling = input_from_pb(request, MAX_MODEL_LEN, DEFAULTS).sampling
    assert (sampling.temperature, sampling.top_k, sampling.max_tokens) == (0.6, 3, 7)


@pytest.mark.parametrize("sent,room", [({}, None), ({"max_tokens": 30}, 30)])
def test_a_truncation_leaves_room_for_the_request_s_own_max_tokens_not_the_default(sent, room):
    """vLLM's server sizes truncate_prompt_tokens=-1 by the max_tokens the request sent (0 without one), before
    its generation-config default is filled in."""
    request = llm_pb2.GenerateRequest(prompt="hi", truncate_prompt_tokens=-1,
                                      sampling=llm_pb2.SamplingParams(**sent))
    generate_input = input_from_pb(request, MAX_MODEL_LEN, DEFAULTS)
    assert generate_input.truncation.max_tokens == room
    assert generate_input.sampling.max_tokens == (room or 7)


@pytest.mark.parametrize("fields", [{}, {"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.5},
                                    {"top_k": 5, "max_tokens": 3}, {"max_tokens": 30},
                                    {"repetition_penalty": 1.0, "min_p": 0.1},
                                    {"presence_penalty": 0.5, "frequency_penalty": -0.5}])
@pytest.mark.parametrize("flags", [{}, {"generation_config": "vllm"}, {"generation_config": "FOLDER"},
                                   {"override_generation_config": {"temperature": 0.1, "max_new_tokens": 5}}])
def test_the_sampling_parameters_equal_vllm_s_server_s(checkpoint_with_defaults, generation_config_folder, fields,
                                                       flags):
    if flags.get("generation_config") == "FOLDER":
        flags = {"generation_config": str(generation_config_folder)}
    config = model_config(checkpoint_with_defaults, **flags)
    ours = to_sampling_params(llm_pb2.SamplingParams(**fields), MAX_MODEL_LEN,
                              SamplingDefaults.from_model_config(config))
    # What vLLM's chat server builds for the same request (a one-token prompt: the context bounds nothing here).
    vllm_defaults = config.get_diff_sampling_param()
    # As vLLM's chat server works out its cap (OpenAIServingChat.override_max_tokens).
    override_max_tokens = (vllm_defaults.get("max_tokens") if config.generation_config not in ("auto", "vllm")
                           else config.override_generation_config.get("max_new_tokens"))
    max_tokens = get_max_tokens(MAX_MODEL_LEN, fields.get("max_tokens"), 1, vllm_defaults, override_max_tokens)
    request = VllmChatRequest(messages=[{"role": "user", "content": "hi"}], **fields)
    theirs = request.to_sampling_params(max_tokens, vllm_defaults)
    for name in NEUTRAL:
        assert getattr(ours, name) == pytest.approx(getattr(theirs, name)), name
    # Ours leaves an unbounded max_tokens to the engine, which stops at the end of the context.
    assert (ours.max_tokens or MAX_MODEL_LEN - 1) == theirs.max_tokens
