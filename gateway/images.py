"""Loads the encoded bytes of a request's images from data:, http(s):// and file:// URLs, within limits.

The gateway never decodes pixels: it only moves bytes, and the vision stage decides whether they are an
image. Downloads are guarded against server-side request forgery: every hop's address is resolved and
checked, and the connection goes to the checked address (the host name is kept for TLS and the Host
header), so a name that resolves differently the second time cannot reach a refused address. An IPv6 address
that carries an IPv4 address (NAT64, 6to4, Teredo, mapped, compatible) is judged as that IPv4 address.
Bodies are read as sent (no Content-Encoding), so the byte limit counts what is held in memory.
"""

import asyncio
import base64
import binascii
import ipaddress
import pathlib
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable

import httpx

from gateway.config import GatewayConfig
from gateway.errors import PayloadTooLarge, hold_any, read_capped
from protos import tracing
from protos.errors import InvalidInput

_REDIRECTS = {301, 302, 303, 307, 308}
# Base64 characters decoded at a time: a multiple of 4, about 4 ms of holding the GIL.
B64_CHUNK_CHARS = 1 << 20

# Told of the bytes an image will keep in memory, before they are kept; raises to refuse them (work limit).
Hold = Callable[[int], None]

# (host, port) -> the host's addresses, socket.gaierror when it has none. The gateway uses the OS resolver;
# tests point names at loopback servers.
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from getaddrinfo, which also reads numeric spellings (2130706433, 0x7f.1, 127.1) as
    every other program on this machine would; the address it returns is the one checked and connected to."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


class ImageLoader:
    """Owns the HTTP client used for image URLs; one per gateway process."""

    def __init__(self, config: GatewayConfig, resolver: Resolver = system_resolver,
                 ssl_context: ssl.SSLContext | None = None):
        """`ssl_context` replaces the system's certificate authorities (tests use one made for a test CA)."""
        self._config = config
        self._resolve = resolver
        # trust_env=False: a proxy from the environment would connect to an address nobody checked.
        self._http = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                       timeout=config.image_fetch_timeout_s,
                                       verify=ssl_context if ssl_context is not None else True)

    async def close(self) -> None:
        await self._http.aclose()

    async def load_all(self, urls: list[str], hold: Hold = hold_any) -> list[bytes]:
        """The bytes of every URL, in order, fetched concurrently; the first failure cancels the others."""
        if len(urls) > self._config.max_images_per_request:
            raise InvalidInput(f"{len(urls)} images in one request; this server allows at most "
                               f"{self._config.max_images_per_request}")
        tasks = [asyncio.ensure_future(self.load(url, i, hold)) for i, url in enumerate(urls)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def load(self, url: str, index: int = 0, hold: Hold = hold_any) -> bytes:
        try:
            with tracing.span("image_fetch") as span:
                data = await self._load(url, index, hold)
                if span.is_recording():
                    span.set_attributes({"image.index": index, "url.scheme": url.split(":", 1)[0].lower(),
                                         "bytes": len(data)})
                return data
        except (ValueError, httpx.InvalidURL) as error:
            # A URL that its parser refuses: a broken IPv6 or octal IPv4 host, a host label over 63 characters,
            # a NUL in a file path, non-ASCII base64. The client's input, not a server failure.
            raise InvalidInput(f"image {index}: malformed URL ({error})") from None

    async def _load(self, url: str, index: int, hold: Hold) -> bytes:
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            data = await asyncio.to_thread(decode_data_url, url, self._config.max_image_bytes, index)
            hold(len(data))
            return data
        if scheme in ("http", "https"):
            try:
                async with asyncio.timeout(self._config.image_fetch_timeout_s):
                    return await self._download(url, index, hold)
            except TimeoutError:
                raise InvalidInput(f"image {index}: download did not finish within "
                                   f"{self._config.image_fetch_timeout_s} s") from None
        if scheme == "file":
            data = await asyncio.to_thread(read_local_file, url, self._config.allowed_local_media_path,
                                           self._config.max_image_bytes, index)
            hold(len(data))
            return data
        raise InvalidInput(f"image {index}: unsupported URL scheme '{scheme}' (use data:, http(s):// or file://)")

    async def _download(self, url: str, index: int, hold: Hold) -> bytes:
        for _ in range(self._config.max_redirects + 1):
            parsed = httpx.URL(url)
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise InvalidInput(f"image {index}: cannot fetch '{url}'")
            address = await self._checked_address(parsed.host, parsed.port, index)
            request = self._http.build_request(
                "GET", parsed.copy_with(host=address),
                headers={"Host": parsed.netloc.decode(), "Accept-Encoding": "identity"},
                extensions={"sni_hostname": parsed.host} if parsed.scheme == "https" else {})
            try:
                response = await self._http.send(request, stream=True)
            except httpx.HTTPError as error:
                raise InvalidInput(f"image {index}: cannot fetch {url}: {type(error).__name__}") from None
            try:
                if response.status_code in _REDIRECTS and "location" in response.headers:
                    url = str(parsed.join(response.headers["location"]))
                    continue
                if response.status_code != 200:
                    raise InvalidInput(f"image {index}: {url} answered HTTP {response.status_code}")
                return await read_unencoded(response, self._config.max_image_bytes, index, hold)
            finally:
                await response.aclose()
        raise InvalidInput(f"image {index}: more than {self._config.max_redirects} redirects")

    async def _checked_address(self, host: str, port: int | None, index: int) -> str:
        """One resolved address of `host`, refused when any of its addresses is not public (unless allowed)."""
        try:
            addresses = await self._resolve(host, port or 443)
        except socket.gaierror:
            raise InvalidInput(f"image {index}: cannot resolve host '{host}'") from None
        if not self._config.allow_private_image_urls:
            for address in addresses:
                if not is_public_address(address):
                    raise InvalidInput(f"image {index}: host '{host}' resolves to a non-public address; "
                                       "image URLs must point to public hosts")
        return addresses[0]


async def read_unencoded(response: httpx.Response, limit: int, index: int, hold: Hold) -> bytes:
    """The body as sent, refused when it carries a Content-Encoding: decoding gzip or brotli would expand a small
    transfer in memory before the limit could count it (a few KB of gzip can hold gigabytes of zeros), and image
    formats are compressed already, so a server that honours our `Accept-Encoding: identity` sends none."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise InvalidInput(f"image {index}: the server sent the image with Content-Encoding '{encoding}'; "
                           "only unencoded image bytes are accepted")
    return await read_capped(response.aiter_raw(), response.headers.get("content-length"), limit, f"image {index}",
                             hold)


# Blocks whose IPv6 addresses reach the IPv4 address in their last 32 bits (RFC 6052 well-known NAT64 prefix;
# RFC 4291 IPv4-compatible). Mapped, 6to4 and Teredo addresses are read by the ipaddress module itself.
_IPV4_IN_LAST_32_BITS = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::/96"))
# RFC 8215 local-use NAT64: where the IPv4 address sits depends on the prefix length the operator chose
# (RFC 6052, /48 to /96), so it cannot be read from the address alone; it is not globally reachable either.
_LOCAL_USE_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (and so reaches, through a translator, relay or the host's own
    IPv4 stack); [] when it carries none."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)  # (server, client); the client is the inverted last 32 bits
    if any(ip in block for block in _IPV4_IN_LAST_32_BITS):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)]
    return []


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_USE_NAT64:
            return False
        if embedded := embedded_ipv4(ip):
            return all(_is_public_ip(v4) for v4 in embedded)
    return _is_public_ip(ip)


def _is_public_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # is_global alone is not enough: on Python 3.11 it is True for reserved ::/8 and for fec0::/10 (site-local).
    if ip.is_multicast or ip.is_reserved or ip.is_private or ip.is_loopback or ip.is_link_local:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return False
    return ip.is_global


def decode_data_url(url: str, limit: int, index: int = 0) -> bytes:
    header, sep, payload = url.partition(",")
    media_type, *params = header.removeprefix("data:").split(";")
    if not sep or "base64" not in params or not media_type.startswith("image/"):
        raise InvalidInput(f"image {index}: data URLs must look like data:image/<type>;base64,<data>")
    # Measured before decoding, so an oversized payload costs no memory beyond the request body.
    decoded_size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if decoded_size > limit:
        raise PayloadTooLarge(f"image {index}: {decoded_size} bytes is above the limit of {limit}")
    try:
        return b64decode_in_chunks(payload)
    except binascii.Error as error:
        raise InvalidInput(f"image {index}: invalid base64 in data URL ({error})") from None


def b64decode_in_chunks(payload: str) -> bytes:
    """base64.b64decode(payload, validate=True), a chunk at a time: decoding holds the GIL (90 ms for 20 MB), so
    from a worker thread it would still stall the event loop; between chunks the loop gets its turn."""
    if "=" in payload[:-2]:
        raise binascii.Error("padding before the end")
    return b"".join(base64.b64decode(payload[start:start + B64_CHUNK_CHARS], validate=True)
                    for start in range(0, len(payload), B64_CHUNK_CHARS))


def read_local_file(url: str, allowed_dir: pathlib.Path | None, limit: int, index: int = 0) -> bytes:
    if allowed_dir is None:
        raise InvalidInput(f"image {index}: file:// URLs are not allowed on this server")
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise InvalidInput(f"image {index}: file:// URLs must name a local path")
    path = pathlib.Path(urllib.request.url2pathname(parsed.path))
    try:
        # resolve() follows symbolic links, so a link inside the directory cannot point out of it.
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InvalidInput(f"image {index}: no such file under the allowed media path") from None
    if not resolved.is_relative_to(allowed_dir.resolve()) or not resolved.is_file():
        raise InvalidInput(f"image {index}: file:// path is outside the allowed media path")
    if resolved.stat().st_size > limit:
        raise PayloadTooLarge(f"image {index}: {resolved.stat().st_size} bytes is above the limit of {limit}")
    return resolved.read_bytes()
