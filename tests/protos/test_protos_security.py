"""Security between the stages against a real server on a loopback port: mutual TLS with certificates made here,
certificate rotation, the plaintext health port, reflection off, bearer tokens; and the flags' validation."""

import contextlib
import io
import logging
import pathlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from deploy.local import free_port
from gateway.config import config_from_args as gateway_config
from protos import vision_pb2, vision_pb2_grpc
from protos.errors import Unavailable
from protos.security import TlsFiles, open_channel
from protos.server import channel_options
from tests.certs import TestPki, server_name
from tests.protos.fake_vision_server import make_server
from vision_svc.config import parse_config as vision_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OPTIONS = channel_options(8 << 20)
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return TestPki(tmp_path_factory.mktemp("pki"))


async def get_info(channel) -> str:
    """The model GetInfo names, or the status code's name when the call fails."""
    try:
        return (await vision_pb2_grpc.VisionEncoderStub(channel).GetInfo(vision_pb2.GetInfoRequest(), timeout=5)).model
    except grpc.aio.AioRpcError as error:
        return error.code().name


async def encode(channel) -> str:
    call = vision_pb2_grpc.VisionEncoderStub(channel).Encode(vision_pb2.EncodeRequest(request_id="ok"), timeout=5)
    try:
        return f"{len([r async for r in call])} messages"
    except grpc.aio.AioRpcError as error:
        return error.code().name


async def list_services(channel) -> str:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    try:
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5)
        return ",".join(sorted([s.name async for r in responses for s in r.list_services_response.service]))
    except grpc.aio.AioRpcError as error:
        return error.code().name


async def health(channel) -> int | str:
    try:
        return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status
    except grpc.aio.AioRpcError as error:
        return error.code().name


# ---- mutual TLS ----------------------------------------------------------------------------------------

async def test_mutual_tls_admits_only_clients_with_a_certificate_of_the_ca(pki):
    server = make_server(tls=pki.stages["vision"])
    port = await server.start()
    await server.set_serving()  # the clients' channels check health
    target = f"127.0.0.1:{port}"
    clients = {
        "llm's certificate": open_channel(target, OPTIONS, pki.stages["llm"], server_name("vision")),
        "no client certificate": open_channel(target, OPTIONS, TlsFiles(ca=pki.ca_path), server_name("vision")),
        "rogue CA's certificate": open_channel(target, OPTIONS, pki.rogue, server_name("vision")),
        "plaintext": open_channel(target, OPTIONS),
        # The server's certificate names vision.internvl.test, not 127.0.0.1: the client refuses the server.
        "no server name": open_channel(target, OPTIONS, pki.stages["llm"]),
        "another server name": open_channel(target, OPTIONS, pki.stages["llm"], server_name("llm")),
    }
    answers = {name: await get_info(channel) for name, channel in clients.items()}
    assert answers == {"llm's certificate": "fake", "no client certificate": "UNAVAILABLE",
                       "rogue CA's certificate": "UNAVAILABLE", "plaintext": "UNAVAILABLE",
                       "no server name": "UNAVAILABLE", "another server name": "UNAVAILABLE"}
    for channel in clients.values():
        await channel.close()
    await server.drain()


async def test_llm_svc_says_why_it_cannot_reach_a_tls_vision_stage(pki):
    """At start llm_svc waits for vision_svc; when the wait ends, the reason the handshake failed is in the error."""
    from llm_svc.vision_client import VisionClient

    server = make_server(tls=pki.stages["vision"])
    port = await server.start()
    await server.set_serving()  # the clients' channels check health
    client = VisionClient([f"127.0.0.1:{port}"], 8 << 20, 8 << 20, tls=pki.stages["llm"], server_name="x.test")
    with pytest.raises(Unavailable, match="Hostname Verification Check failed"):
        await client.get_info(timeout_s=1)
    await client.close()
    await server.drain()


async def test_tls_without_a_ca_serves_any_client(pki):
    """--tls-cert and --tls-key alone: the connection is encrypted, the client is not asked for a certificate."""
    vision = pki.stages["vision"]
    server = make_server(tls=TlsFiles(vision.cert, vision.key))
    port = await server.start()
    await server.set_serving()  # the clients' channels check health
    async with open_channel(f"127.0.0.1:{port}", OPTIONS, TlsFiles(ca=pki.ca_path), server_name("vision")) as channel:
        assert await get_info(channel) == "fake"
    await server.drain()


async def test_a_rotated_certificate_is_served_to_new_connections(pki, tmp_path):
    rotating = pki.issue("rotating", "before.internvl.test")
    server = make_server(tls=rotating)
    port = await server.start()
    await server.set_serving()  # the clients' channels check health
    target = f"127.0.0.1:{port}"
    async with open_channel(target, OPTIONS, pki.stages["llm"], "before.internvl.test") as channel:
        assert await get_info(channel) == "fake"
    pki.issue("rotating", "after.internvl.test")  # rewrites the same two files, as a Secret update does
    async with open_channel(target, OPTIONS, pki.stages["llm"], "after.internvl.test") as channel:
        assert await get_info(channel) == "fake"
    async with open_channel(target, OPTIONS, pki.stages["llm"], "before.internvl.test") as channel:
        assert await get_info(channel) == "UNAVAILABLE"
    await server.drain()


async def test_health_port_serves_plaintext_health_alone(pki):
    health_port = free_port()
    server = make_server(tls=pki.stages["vision"], health_port=health_port, auth_token=TOKEN)
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as probe:
        assert await health(probe) == NOT_SERVING
        await server.set_serving()
        assert await health(probe) == SERVING
        assert await get_info(probe) == "UNIMPLEMENTED"
        assert await list_services(probe) == "UNIMPLEMENTED"
        await server.drain()
        assert await health(probe) == "UNAVAILABLE"


# ---- reflection and tokens -----------------------------------------------------------------------------

async def test_reflection_can_be_turned_off():
    server = make_server(reflection=False)
    port = await server.start()
    await server.set_serving()  # the clients' channels check health
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert await list_services(channel) == "UNIMPLEMENTED"
        assert await get_info(channel) == "fake"
    await server.drain()


async def test_every_call_but_health_needs_the_token(caplog):
    server = make_server(auth_token=TOKEN)
    port = await server.start()
    await server.set_serving()
    target = f"127.0.0.1:{port}"
    calls = {"GetInfo": get_info, "Encode": encode, "reflection": list_services, "health": health}
    with caplog.at_level(logging.DEBUG):
        answers = {}
        for name, token in (("none", None), ("wrong", "not-the-token"), ("right", TOKEN)):
            async with open_channel(target, OPTIONS, token=token) as channel:
                answers[name] = {call: await run(channel) for call, run in calls.items()}
    refused = {"GetInfo": "UNAUTHENTICATED", "Encode": "UNAUTHENTICATED", "reflection": "UNAUTHENTICATED",
               "health": SERVING}
    assert answers["none"] == answers["wrong"] == refused
    assert answers["right"] == {"GetInfo": "fake", "Encode": "2 messages",
                                "reflection": "grpc.health.v1.Health,grpc.reflection.v1alpha.ServerReflection,"
                                              "internvl.vision.v1.VisionEncoder", "health": SERVING}
    assert "refused: no valid bearer token" in caplog.text and TOKEN not in caplog.text
    await server.drain()


async def test_token_and_mutual_tls_together(pki):
    server = make_server(tls=pki.stages["vision"], auth_token=TOKEN)
    port = await server.start()
    await server.set_serving()  # the clients' channels check health
    target = f"127.0.0.1:{port}"
    async with open_channel(target, OPTIONS, pki.stages["llm"], server_name("vision"), TOKEN) as channel:
        assert (await get_info(channel), await encode(channel)) == ("fake", "2 messages")
    async with open_channel(target, OPTIONS, pki.stages["llm"], server_name("vision")) as channel:
        assert (await get_info(channel), await encode(channel)) == ("UNAUTHENTICATED", "UNAUTHENTICATED")
    await server.drain()


# ---- the flags -----------------------------------------------------------------------------------------

def refusal(parse, argv: list[str]) -> str:
    """The message with which a stage's parser refuses `argv` (its usage error, or the config's ValueError)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            parse(argv)
    except SystemExit:
        return stderr.getvalue()
    except ValueError as error:
        return str(error)
    raise AssertionError(f"{argv} accepted")


@pytest.fixture(scope="module")
def files(pki, tmp_path_factory):
    directory = tmp_path_factory.mktemp("files")
    (directory / "empty").write_text("\n")
    (directory / "token").write_text(TOKEN + "\n")
    (directory / "not-pem").write_text("hello")
    return {"cert": str(pki.stages["vision"].cert), "key": str(pki.stages["vision"].key), "ca": str(pki.ca_path),
            "missing": str(directory / "missing"), "empty": str(directory / "empty"),
            "token": str(directory / "token"), "not-pem": str(directory / "not-pem")}


VISION_REFUSALS = [
    (["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
    (["--tls-key", "{key}"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "{cert}", "--tls-key", "{missing}"], "--tls-key {missing}: cannot read it (No such file"),
    (["--tls-cert", "{not-pem}", "--tls-key", "{key}"], "--tls-cert {not-pem}: not a PEM file"),
    (["--tls-ca", "{ca}"], "--tls-ca needs --tls-cert and --tls-key"),
    (["--health-port", "50051"], "--health-port must differ from --port"),
    (["--health-port", "0"], "--health-port must be a port number"),
    (["--auth-token-file", "{empty}"], "--auth-token-file {empty}: the token is empty"),
    (["--auth-token-file", "{missing}"], "--auth-token-file {missing}: cannot read the token"),
]


@pytest.mark.parametrize("argv, words", VISION_REFUSALS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_vision_refuses_bad_security_flags(files, argv, words):
    argv = ["--model", "m", *(a.format(**files) for a in argv)]
    assert words.format(**files) in refusal(vision_config, argv)


def test_security_flags_reach_the_configs_and_tokens_stay_out_of_them(files):
    config = vision_config(["--model", "m", "--tls-cert", files["cert"], "--tls-key", files["key"], "--tls-ca",
                            files["ca"], "--auth-token-file", files["token"], "--health-port", "9000",
                            "--no-reflection"])
    assert config.tls == TlsFiles(pathlib.Path(files["cert"]), pathlib.Path(files["key"]), pathlib.Path(files["ca"]))
    assert (config.auth_token, config.health_port, config.reflection) == (TOKEN, 9000, False)
    assert TOKEN not in repr(config)
    gateway = gateway_config(["--llm", "127.0.0.1:1", "--tls-ca", files["ca"], "--tls-server-name", "llm.test",
                              "--llm-auth-token-file", files["token"]])
    assert (gateway.tls.ca is not None, gateway.tls.cert, gateway.tls_server_name) == (True, None, "llm.test")
    assert gateway.llm_auth_token == TOKEN and TOKEN not in repr(gateway)
    assert "--tls-server-name needs TLS" in refusal(gateway_config, ["--llm", "a:1", "--tls-server-name", "x"])
    assert "--llm-auth-token-file" in refusal(gateway_config, ["--llm", "a:1", "--llm-auth-token-file",
                                                               files["missing"]])


def test_llm_svc_takes_both_sides_of_the_flags(files):
    from llm_svc.config import parse_config as llm_config

    config, _ = llm_config(["--model", "m", "--vision", "127.0.0.1:1", "--tls-cert", files["cert"], "--tls-key",
                            files["key"], "--tls-ca", files["ca"], "--tls-server-name", "vision.test",
                            "--vision-auth-token-file", files["token"], "--auth-token-file", files["token"],
                            "--health-port", "9001", "--no-reflection"])
    assert (config.tls_server_name, config.health_port, config.reflection) == ("vision.test", 9001, False)
    assert config.auth_token == config.vision_auth_token == TOKEN and TOKEN not in repr(config)
    assert "--tls-ca needs --tls-cert" in refusal(llm_config, ["--model", "m", "--vision", "a:1", "--tls-ca",
                                                               files["ca"]])
