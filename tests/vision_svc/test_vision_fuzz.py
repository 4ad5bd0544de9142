"""vision_svc under generated EncodeRequests (random bytes as images and as content hashes, header-only bombs,
truncated files, extreme tile limits and thumbnail values, huge repeated fields): every call succeeds or ends with
a client status, never INTERNAL or UNKNOWN, and the stage stays SERVING.

A bounded, reproducible run of `bench.fuzz`'s strategies; `python -m bench.fuzz --minutes N` runs them longer."""

import grpc
import pytest
from hypothesis import given

from bench import fuzz
from protos import vision_pb2, vision_pb2_grpc
from tests.stack import start_vision


@pytest.fixture(scope="module")
def vision(tiny_checkpoint, tmp_path_factory):
    stage = start_vision(tiny_checkpoint(layout="original", llm="dense"), tmp_path_factory.mktemp("logs"))
    stage.wait_ready()
    channel = grpc.insecure_channel(stage.address)
    yield stage, vision_pb2_grpc.VisionEncoderStub(channel)
    channel.close()
    stage.stop()


def test_generated_encode_requests_get_no_internal_error(vision):
    stage, stub = vision

    @fuzz.bounded_run(max_examples=150)
    @given(request=fuzz.encode_request_pb())
    def encode(request):
        code, details = fuzz.grpc_code(stub.Encode(request, timeout=60))
        assert code not in fuzz.GRPC_SERVER_ERRORS, f"{code}: {details} for {fuzz.summary(request)}"

    encode()
    assert fuzz.grpc_serving(stage.address)
    image = vision_pb2.ImageInput(data=fuzz.png(100, 100))
    assert fuzz.grpc_code(stub.Encode(vision_pb2.EncodeRequest(images=[image]), timeout=60)) == ("OK", "")


def test_bytes_that_are_not_an_encode_request_are_invalid_argument(vision):
    stage, _ = vision
    with grpc.insecure_channel(stage.address) as channel:
        raw = channel.unary_stream("/internvl.vision.v1.VisionEncoder/Encode")  # no serializers: bytes as they are
        # Field 2 (images), holding field 2 (content_hash) with a byte that is not UTF-8.
        code, _ = fuzz.grpc_code(raw(b"\x12\x03\x12\x01\xff", timeout=30))
    assert code == "INVALID_ARGUMENT"
