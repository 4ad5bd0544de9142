"""Image URLs against server-side request forgery: which addresses count as public, numeric host spellings,
compressed bodies against the byte limit, and HTTPS to a pinned address with the certificate checked for the name."""

import base64
import binascii
import contextlib
import functools
import gzip
import http.server
import ipaddress
import random
import ssl
import threading

import httpx
import pytest
import trustme

from gateway import app as gateway_app
from gateway.config import GatewayConfig
from gateway.images import (B64_CHUNK_CHARS, ImageLoader, b64decode_in_chunks, embedded_ipv4, is_public_address,
                            system_resolver)

PUBLIC = [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2001:4860:4860::8888",
    "::ffff:8.8.8.8",                            # IPv4-mapped
    "64:ff9b::808:808", "64:ff9b::1.1.1.1",      # NAT64 well-known prefix
    "2002:808:808::1",                           # 6to4
    "::8.8.8.8",                                 # IPv4-compatible
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7",      # Teredo, server 65.54.227.120, client ~f7f7:f7f7 = 8.8.8.8
]
NOT_PUBLIC = [
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",
    "169.254.169.254", "100.64.0.1", "0.0.0.0", "0.1.2.3", "192.0.2.1", "198.18.0.1", "240.0.0.1",
    "255.255.255.255", "224.0.0.1", "239.255.255.250",
    "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1", "ff0e::1",
    "2001:db8::1", "100::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::10.0.0.1", "64:ff9b::0.0.0.0",
    "64:ff9b:1::808:808",                        # local-use NAT64: the IPv4's position is the operator's choice
    "2002:7f00:1::", "2002:a9fe:a9fe::1", "2002:a00:1::1", "2002:c0a8:101::1",
    "::127.0.0.1", "::10.0.0.1", "::169.254.169.254",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",      # Teredo client ~80ff:fffe = 127.0.0.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",      # Teredo client 10.0.0.1
    "2001:0:a00:1:8000:63bf:f7f7:f7f7",          # Teredo server 10.0.0.1
]


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses(address):
    assert is_public_address(address)


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_addresses_that_are_not_public(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address, ipv4", [
    ("::ffff:7f00:1", ["127.0.0.1"]),
    ("64:ff9b::a9fe:a9fe", ["169.254.169.254"]),
    ("2002:c0a8:101::1", ["192.168.1.1"]),
    ("::a00:1", ["10.0.0.1"]),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", ["65.54.227.120", "127.0.0.1"]),
    ("2606:4700:4700::1111", []),
])
def test_the_ipv4_an_ipv6_address_carries(address, ipv4):
    assert embedded_ipv4(ipaddress.IPv6Address(address)) == [ipaddress.IPv4Address(a) for a in ipv4]


async def post_image(base: str, image_url: str) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                      {"type": "image_url", "image_url": {"url": image_url}}]}]}
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(f"{base}/v1/chat/completions", json=body)


def assert_400(response: httpx.Response, words: str) -> None:
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"], response.text


def image_sent(request) -> bytes:
    return request.chat.messages[0].content[1].image.data


NUMERIC_LOOPBACK = ["2130706433", "0x7f.1", "0x7f000001", "127.1", "017700000001", "0177.1", "0x7f.0.0.1"]


async def test_numeric_spellings_are_read_as_the_os_resolver_reads_them(start_gateway, image_server, fake):
    base, images = image_server
    port = base.rsplit(":", 1)[1]
    async with start_gateway() as url:
        for host in NUMERIC_LOOPBACK:
            assert_400(await post_image(url, f"http://{host}:{port}/red.png"), "non-public address")
        # Four dotted parts with a leading zero or above 255: the URL parser refuses them before any lookup.
        for host in ("0177.0.0.1", "127.0.0.01", "08.8.8.8", "999.1.1.1"):
            response = await post_image(url, f"http://{host}:{port}/red.png")
            assert response.status_code == 400, response.text
    assert fake.requests == []
    async with start_gateway(allow_private_image_urls=True) as url:
        for host in ("2130706433", "0x7f.1"):
            assert (await post_image(url, f"http://{host}:{port}/red.png")).status_code == 200
    assert [image_sent(r) for r in fake.requests] == [images["/red.png"]] * 2


class _EncodingHandler(http.server.BaseHTTPRequestHandler):
    """/bomb.png: `bomb`, gzip-encoded whatever the client asked; any other path: `image`, gzip-encoded only when
    the client accepts gzip."""

    image = b""
    bomb = b""
    accept_encodings: list[str] = []

    def do_GET(self):
        accepted = self.headers.get("Accept-Encoding", "")
        self.accept_encodings.append(accepted)
        if self.path == "/bomb.png":
            body, encoding = self.bomb, "gzip"
        elif "gzip" in accepted:
            body, encoding = gzip.compress(self.image), "gzip"
        else:
            body, encoding = self.image, None
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler, ssl_context: ssl.SSLContext | None = None):
    """A threaded HTTP(S) server on 127.0.0.1 running `handler`; yields its port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


async def test_compressed_bodies_are_never_expanded(start_gateway, fake, png):
    _EncodingHandler.image = png()
    _EncodingHandler.bomb = gzip.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in about 64 KB
    _EncodingHandler.accept_encodings = []
    with serving(_EncodingHandler) as port:
        async with start_gateway(max_image_bytes=1 << 20, allow_private_image_urls=True) as url:
            # Under the limit on the wire, 64 times over it once decoded: refused for its encoding, never decoded.
            assert_400(await post_image(url, f"http://127.0.0.1:{port}/bomb.png"), "Content-Encoding 'gzip'")
            assert (await post_image(url, f"http://127.0.0.1:{port}/polite.png")).status_code == 200
    assert _EncodingHandler.accept_encodings == ["identity", "identity"]
    assert [image_sent(r) for r in fake.requests] == [png()]


class _TlsImageHandler(http.server.BaseHTTPRequestHandler):
    image = b""
    hosts: list[str] = []

    def do_GET(self):
        self.hosts.append(self.headers.get("Host"))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.image)))
        self.end_headers()
        self.wfile.write(self.image)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def tls_image_server():
    """An HTTPS server on 127.0.0.1 whose certificate, from a CA made here, names only images.test; yields
    (port, a client SSL context trusting that CA, the SNI names the server received)."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("images.test").configure_cert(server_context)
    sni_names = []
    server_context.sni_callback = lambda _sock, name, _ctx: sni_names.append(name)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with serving(_TlsImageHandler, server_context) as port:
        yield port, client_context, sni_names


async def test_https_connects_to_the_pinned_address_and_checks_the_certificate_for_the_name(
        tls_image_server, start_gateway, fake, png, monkeypatch):
    port, client_context, sni_names = tls_image_server
    lookups = []

    async def test_names_on_loopback(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"] if host.endswith(".test") else await system_resolver(host, port)

    monkeypatch.setattr(gateway_app, "ImageLoader",
                        functools.partial(ImageLoader, resolver=test_names_on_loopback, ssl_context=client_context))
    _TlsImageHandler.image = png(color=(0, 128, 0))
    _TlsImageHandler.hosts = []
    async with start_gateway(allow_private_image_urls=True) as url:
        assert (await post_image(url, f"https://images.test:{port}/green.png")).status_code == 200
        assert image_sent(fake.requests[0]) == png(color=(0, 128, 0))
        assert lookups == ["images.test"]  # resolved once, then connected to that address
        assert sni_names == ["images.test"] and _TlsImageHandler.hosts == [f"images.test:{port}"]
        # The same server under a name its certificate does not carry: the handshake fails on the name.
        assert_400(await post_image(url, f"https://other.test:{port}/green.png"),
                   f"cannot fetch https://other.test:{port}/green.png: ConnectError")
        assert sni_names == ["images.test", "other.test"] and len(_TlsImageHandler.hosts) == 1
    async with start_gateway() as url:
        assert_400(await post_image(url, f"https://images.test:{port}/green.png"),
                   "host 'images.test' resolves to a non-public address")
    assert len(fake.requests) == 1


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 100, B64_CHUNK_CHARS // 4 * 3 - 1, B64_CHUNK_CHARS // 4 * 3,
                                  B64_CHUNK_CHARS // 4 * 3 + 1, 3 * B64_CHUNK_CHARS + 5])
def test_base64_decoded_in_chunks_equals_one_decode(size):
    data = random.Random(size).randbytes(size)
    assert b64decode_in_chunks(base64.b64encode(data).decode()) == data


@pytest.mark.parametrize("payload", ["QQ==QUFB", "QQ=", "QUF", "QU@B", "QUFB" * (B64_CHUNK_CHARS // 4) + "QQ=="[:3],
                                     "QQ==" + "QUFB" * (B64_CHUNK_CHARS // 4)])
def test_base64_decoded_in_chunks_refuses_what_one_decode_refuses(payload):
    with pytest.raises(binascii.Error):
        base64.b64decode(payload, validate=True)
    with pytest.raises(binascii.Error):
        b64decode_in_chunks(payload)


async def test_data_urls_are_decoded_off_the_event_loop(monkeypatch):
    decoded_on = []

    def recording_decode(payload: str) -> bytes:
        decoded_on.append(threading.current_thread())
        return base64.b64decode(payload)

    monkeypatch.setattr("gateway.images.b64decode_in_chunks", recording_decode)
    loader = ImageLoader(GatewayConfig(llm_targets=("127.0.0.1:1",)))
    try:
        assert await loader.load("data:image/png;base64,aGk=") == b"hi"
    finally:
        await loader.close()
    assert decoded_on and threading.main_thread() not in decoded_on
