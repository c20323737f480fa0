"""Fetching a client's http(s) image URL without letting the client reach the server's own networks.

The server fetches image URLs on a client's behalf, so a URL must not make it read from an address
the client could not reach itself: loopback (the Ray dashboard and job API, other local services),
private networks, link-local addresses (cloud metadata at 169.254.169.254), multicast, unspecified
or reserved addresses, in IPv4, IPv6 and the IPv6 forms that embed an IPv4 address (::ffff:a.b.c.d,
6to4, NAT64). The host of every hop is resolved once, every address it resolves to is checked, and
the connection goes to a checked address (no second lookup, so a DNS answer that changes between
the check and the connection cannot redirect it). Redirects are followed here, hop by hop, each hop
checked again. Each hop is bounded: a connect timeout, a deadline for the whole answer (a source
that drips bytes is cut there), a size cap and a maximum number of redirects.

HTTP(S)_PROXY variables are not used: a proxy would make the connection instead of this module.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from model.images import ImageLoadError, describe_source

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "qwen2_5_vl_ray"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_CHUNK = 64 * 1024


class MediaFetchError(ImageLoadError):
    """An image URL was refused by the media policy or could not be fetched within its bounds."""


@dataclass(frozen=True)
class MediaFetchPolicy:
    """What the server may fetch (the serve.* keys named in brackets).

    allowed_domains: host names URLs may name, on every hop; None: any [allowed_media_domains].
    allow_private: fetch from loopback, private, link-local ... addresses too [allow_private_media_urls].
    connect_timeout_s: bound on each TCP (and TLS) connect [media_connect_timeout_s].
    read_timeout_s: bound on each answer, from the request sent to its last byte [media_read_timeout_s].
    max_bytes: largest body accepted [max_media_bytes].
    max_redirects: most redirects followed [max_media_redirects].
    """

    allowed_domains: tuple[str, ...] | None = None
    allow_private: bool = False
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    max_bytes: int = 32 * 1024 * 1024
    max_redirects: int = 3
    kind: str = "image"  # what is fetched, for the Accept header and messages ("video": serve.max_video_bytes)
    max_bytes_key: str = "serve.max_media_bytes"


def address_refusal(address: IPAddress) -> str | None:
    """Why an address is not one the server may fetch from for a client ("loopback", ...), or None."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            why = address_refusal(embedded)
            return f"{why} (IPv4 {embedded} inside IPv6)" if why else None
        if address.is_site_local:
            return "site-local"
    for why, hit in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("not globally routable", not address.is_global),  # e.g. 100.64.0.0/10, shared address space
    ):
        if hit:
            return why
    return None


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in the resolver's order (an IP literal is its own answer)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise MediaFetchError(f"cannot resolve image host {host!r}: {e}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def checked_addresses(host: str, port: int, policy: MediaFetchPolicy, resolver: Resolver = resolve) -> list[str]:
    """The addresses of `host` to connect to; MediaFetchError if the host is not allowed or any of
    its addresses is not public (unless policy.allow_private)."""
    if policy.allowed_domains is not None and host not in policy.allowed_domains:
        raise MediaFetchError(f"image host {host!r} is not in serve.allowed_media_domains")
    addresses = resolver(host, port)
    if not addresses:
        raise MediaFetchError(f"image host {host!r} resolves to no address")
    if not policy.allow_private:
        for text in addresses:
            why = address_refusal(ipaddress.ip_address(text.split("%", 1)[0]))
            if why is not None:
                raise MediaFetchError(
                    f"image host {host!r} resolves to {text}, a {why} address; the server does not fetch "
                    "from its own networks unless serve.allow_private_media_urls=true"
                )
    return addresses


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to a checked address; `host` still names the server (Host header)."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(_PinnedHTTP):
    """HTTPS to a checked address; the certificate is verified against the host name (SNI too)."""

    tls = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.host)


def _cut(sock: socket.socket, fired: threading.Event) -> None:
    """Wake a read blocked on `sock` (the answer's deadline passed)."""
    fired.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _get(url: str, policy: MediaFetchPolicy, resolver: Resolver) -> tuple[int, str, bytes]:
    """One hop: (status, Location header, body). The body is read only for a 200."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MediaFetchError(f"not an http(s) URL with a host: {describe_source(url)}")
    host = parts.hostname.lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise MediaFetchError(f"bad port in image URL {describe_source(url)}: {e}") from None
    kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    errors = []
    for address in checked_addresses(host, port, policy, resolver):
        connection = kind(host, port, address, policy.connect_timeout_s)
        try:
            connection.connect()
        except OSError as e:
            errors.append(f"{address}: {e}")
            connection.close()
            continue
        return _answer(connection, target, url, policy)
    raise MediaFetchError(f"cannot connect to image host {host!r}: {'; '.join(errors)}")


def _answer(connection: http.client.HTTPConnection, target: str, url: str, policy: MediaFetchPolicy) -> tuple:
    fired = threading.Event()
    sock = connection.sock  # the response reads from it even once the connection lets go of it
    sock.settimeout(policy.read_timeout_s)
    deadline = threading.Timer(policy.read_timeout_s, _cut, (sock, fired))
    deadline.start()
    try:
        connection.request("GET", target, headers={"User-Agent": USER_AGENT, "Accept": f"{policy.kind}/*"})
        response = connection.getresponse()
        if response.status in REDIRECTS:
            return response.status, response.getheader("Location") or "", b""
        if response.status != 200:
            raise MediaFetchError(f"cannot fetch {policy.kind} {url}: HTTP {response.status} {response.reason}")
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > policy.max_bytes:
            raise MediaFetchError(
                f"{policy.kind} at {url} is {int(length)} bytes, more than {policy.max_bytes_key}={policy.max_bytes}"
            )
        body = bytearray()
        while len(body) <= policy.max_bytes and (chunk := response.read(_CHUNK)):
            body += chunk
        if fired.is_set():
            raise TimeoutError
        if len(body) > policy.max_bytes:
            raise MediaFetchError(
                f"{policy.kind} at {url} is more than {policy.max_bytes_key}={policy.max_bytes} bytes"
            )
        return 200, "", bytes(body)
    except (OSError, http.client.HTTPException) as e:
        if fired.is_set() or isinstance(e, TimeoutError):
            raise MediaFetchError(
                f"{policy.kind} at {url} was not received within serve.media_read_timeout_s={policy.read_timeout_s}"
            ) from None
        raise MediaFetchError(f"cannot fetch {policy.kind} {url}: {e}") from None
    finally:
        deadline.cancel()
        connection.close()


def fetch_media(url: str, policy: MediaFetchPolicy, resolver: Resolver = resolve) -> bytes:
    """The body of an http(s) image URL under `policy`, following at most policy.max_redirects
    redirects, each hop checked as the first.

    Raises:
        MediaFetchError: the URL or a hop is refused (host not allowed, a non-public address), or the
            fetch failed, timed out, was too large or redirected too often; the message says which.
    """
    for _ in range(policy.max_redirects + 1):
        status, location, body = _get(url, policy, resolver)
        if status == 200:
            return body
        if not location:
            raise MediaFetchError(f"cannot fetch image {url}: HTTP {status} without a Location")
        url = urljoin(url, location)
    raise MediaFetchError(
        f"image URL redirected more than serve.max_media_redirects={policy.max_redirects} times "
        f"(the last to {describe_source(url)})"
    )
