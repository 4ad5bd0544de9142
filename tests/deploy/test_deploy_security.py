"""Security between the real stages: the whole pipeline under mutual TLS with a bearer token on each hop; each gRPC
stage refuses clients without a certificate, with one of a rogue CA, in plaintext, or without the token; probes
get plaintext health on the health port."""

import base64
import pathlib

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import llm_pb2, llm_pb2_grpc, vision_pb2, vision_pb2_grpc
from protos.security import TlsFiles, open_channel
from protos.server import channel_options
from tests.certs import TestPki, server_name
from tests.llm_svc.llm_helpers import image, png_bytes
from tests.stack import start_gateway, start_llm, start_vision, stop_all

OPTIONS = channel_options(8 << 20)
TOKENS = {"vision": "vision-token-4f1c9a", "llm": "llm-token-7d2e0b"}


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint(layout="original", llm="dense")
    pki = TestPki(tmp_path_factory.mktemp("pki"))
    logs = tmp_path_factory.mktemp("logs")
    token_files = {}
    for stage, token in TOKENS.items():
        token_files[stage] = pki.directory / f"{stage}.token"
        token_files[stage].write_text(token + "\n")
    vision = start_vision(model, logs, *pki.flags("vision"), "--auth-token-file", str(token_files["vision"]),
                          "--no-reflection")
    # Started with vision_svc, not after it: llm_svc waits for vision_svc by itself.
    llm = start_llm(model, [vision], logs, *pki.flags("llm"), "--tls-server-name", server_name("vision"),
                    "--vision-auth-token-file", str(token_files["vision"]),
                    "--auth-token-file", str(token_files["llm"]))
    vision.wait_ready()
    llm.wait_ready()
    gateway = start_gateway([llm], logs, *pki.flags("gateway"), "--tls-server-name", server_name("llm"),
                            "--llm-auth-token-file", str(token_files["llm"])).wait_ready()
    yield {"pki": pki, "vision": vision, "llm": llm, "gateway": gateway}
    stop_all([gateway, llm, vision])


def test_chat_with_an_image_through_mutual_tls(stack):
    gateway = f"http://{stack['gateway'].address}"
    model = httpx.get(f"{gateway}/v1/models").json()["data"][0]["id"]
    picture = "data:image/png;base64," + base64.b64encode(png_bytes(image(600, 400, seed=3))).decode()
    body = {"model": model, "max_tokens": 5, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": picture}}, {"type": "text", "text": "Describe the image."}]}]}
    response = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    # 256 tokens per tile: the image's embeddings came from vision_svc, over mutual TLS.
    assert usage["prompt_tokens"] > 256 and usage["completion_tokens"] == 5


async def call_stage(stage: str, channel) -> str:
    """The stage's info call ('ok'), or the status code's name when it fails."""
    try:
        if stage == "vision":
            await vision_pb2_grpc.VisionEncoderStub(channel).GetInfo(vision_pb2.GetInfoRequest(), timeout=10)
        else:
            await llm_pb2_grpc.LanguageModelStub(channel).GetModelInfo(llm_pb2.GetModelInfoRequest(), timeout=10)
        return "ok"
    except grpc.aio.AioRpcError as error:
        return error.code().name


@pytest.mark.parametrize("stage, caller", [("vision", "llm"), ("llm", "gateway")])
async def test_a_stage_admits_only_its_caller_with_certificate_and_token(stack, stage, caller):
    pki, target, name, token = stack["pki"], stack[stage].address, server_name(stage), TOKENS[stage]
    clients = {
        "caller": open_channel(target, OPTIONS, pki.stages[caller], name, token),
        "caller without token": open_channel(target, OPTIONS, pki.stages[caller], name),
        "caller with the other stage's token": open_channel(target, OPTIONS, pki.stages[caller], name,
                                                            TOKENS["llm" if stage == "vision" else "vision"]),
        "no client certificate": open_channel(target, OPTIONS, TlsFiles(ca=pki.ca_path), name, token),
        "rogue CA's certificate": open_channel(target, OPTIONS, pki.rogue, name, token),
        "plaintext": open_channel(target, OPTIONS, token=token),
    }
    answers = {client: await call_stage(stage, channel) for client, channel in clients.items()}
    assert answers == {"caller": "ok", "caller without token": "UNAUTHENTICATED",
                       "caller with the other stage's token": "UNAUTHENTICATED",
                       "no client certificate": "UNAVAILABLE", "rogue CA's certificate": "UNAVAILABLE",
                       "plaintext": "UNAVAILABLE"}
    for channel in clients.values():
        await channel.close()


@pytest.mark.parametrize("stage", ["vision", "llm"])
async def test_health_port_answers_serving_in_plaintext(stack, stage):
    assert stack[stage].health_address != stack[stage].address
    async with grpc.aio.insecure_channel(stack[stage].health_address) as probe:
        answer = await health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert await call_stage(stage, probe) == "UNIMPLEMENTED"  # health alone


@pytest.mark.parametrize("stage, caller, listed", [("vision", "llm", "UNIMPLEMENTED"), ("llm", "gateway", "listed")])
async def test_reflection_is_off_where_asked(stack, stage, caller, listed):
    async with open_channel(stack[stage].address, OPTIONS, stack["pki"].stages[caller], server_name(stage),
                            TOKENS[stage]) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        # A stream refused at once can race the client's own request write, which then ends INTERNAL instead of
        # with the server's UNIMPLEMENTED: asked again, the server's answer shows.
        for _ in range(3):
            try:
                responses = stub.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
                names = [s.name async for r in responses for s in r.list_services_response.service]
                answer = "listed" if "internvl.llm.v1.LanguageModel" in names else str(names)
            except grpc.aio.AioRpcError as error:
                answer = error.code().name
            if answer != "INTERNAL":
                break
    assert answer == listed


def test_tokens_appear_in_no_command_line_and_no_log(stack):
    for stage in ("vision", "llm", "gateway"):
        command_line = pathlib.Path(f"/proc/{stack[stage].proc.pid}/cmdline").read_bytes().decode()
        log = stack[stage].log_path.read_text(errors="replace")
        for token in TOKENS.values():
            assert token not in command_line and token not in log, stage
