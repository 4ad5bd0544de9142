"""Loads the encoded bytes of a request's images from data:, http(s):// and file:// URLs, within limits.

The gateway never decodes pixels: it only moves bytes, and the vision stage decides whether they are an
image. Downloads are guarded against server-side request forgery: every hop's address is resolved and
checked, and the connection goes to the checked address (the host name is kept for TLS and the Host
header), so a name that resolves differently the second time cannot reach a refused address.
"""

import asyncio
import base64
import binascii
import ipaddress
import pathlib
import socket
import urllib.parse
import urllib.request

import httpx

from gateway.config import GatewayConfig
from gateway.errors import PayloadTooLarge, read_capped
from protos.errors import InvalidInput

_REDIRECTS = {301, 302, 303, 307, 308}


class ImageLoader:
    """Owns the HTTP client used for image URLs; one per gateway process."""

    def __init__(self, config: GatewayConfig):
        self._config = config
        # trust_env=False: a proxy from the environment would connect to an address nobody checked.
        self._http = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                       timeout=config.image_fetch_timeout_s)

    async def close(self) -> None:
        await self._http.aclose()

    async def load_all(self, urls: list[str]) -> list[bytes]:
        """The bytes of every URL, in order, fetched concurrently; the first failure cancels the others."""
        if len(urls) > self._config.max_images_per_request:
            raise InvalidInput(f"{len(urls)} images in one request; this server allows at most "
                               f"{self._config.max_images_per_request}")
        tasks = [asyncio.ensure_future(self.load(url, i)) for i, url in enumerate(urls)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def load(self, url: str, index: int = 0) -> bytes:
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            return decode_data_url(url, self._config.max_image_bytes, index)
        if scheme in ("http", "https"):
            try:
                async with asyncio.timeout(self._config.image_fetch_timeout_s):
                    return await self._download(url, index)
            except TimeoutError:
                raise InvalidInput(f"image {index}: download did not finish within "
                                   f"{self._config.image_fetch_timeout_s} s") from None
        if scheme == "file":
            return await asyncio.to_thread(read_local_file, url, self._config.allowed_local_media_path,
                                           self._config.max_image_bytes, index)
        raise InvalidInput(f"image {index}: unsupported URL scheme '{scheme}' (use data:, http(s):// or file://)")

    async def _download(self, url: str, index: int) -> bytes:
        for _ in range(self._config.max_redirects + 1):
            parsed = httpx.URL(url)
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise InvalidInput(f"image {index}: cannot fetch '{url}'")
            address = await self._checked_address(parsed.host, parsed.port, index)
            request = self._http.build_request(
                "GET", parsed.copy_with(host=address), headers={"Host": parsed.netloc.decode()},
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
                return await read_capped(response.aiter_bytes(), response.headers.get("content-length"),
                                         self._config.max_image_bytes, f"image {index}")
            finally:
                await response.aclose()
        raise InvalidInput(f"image {index}: more than {self._config.max_redirects} redirects")

    async def _checked_address(self, host: str, port: int | None, index: int) -> str:
        """One resolved address of `host`, refused when any of its addresses is not public (unless allowed)."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port or 443, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise InvalidInput(f"image {index}: cannot resolve host '{host}'") from None
        addresses = [info[4][0] for info in infos]
        if not self._config.allow_private_image_urls:
            for address in addresses:
                if not is_public_address(address):
                    raise InvalidInput(f"image {index}: host '{host}' resolves to a non-public address; "
                                       "image URLs must point to public hosts")
        return addresses[0]


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


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
        return base64.b64decode(payload, validate=True)
    except binascii.Error as error:
        raise InvalidInput(f"image {index}: invalid base64 in data URL ({error})") from None


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
