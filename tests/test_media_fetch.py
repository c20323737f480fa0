"""cluster.media_fetch: which addresses the server refuses to fetch from, checked after resolution on
every address and every redirect hop, and the bounds on each fetch. Real connections go only to
loopback servers the tests start (tests/media_servers.py); other addresses come from a fake
resolver, with connecting made to fail the test."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from cluster import media_fetch
from cluster.media_fetch import MediaFetchError, MediaFetchPolicy, address_refusal, checked_addresses, fetch_media
from tests.media_servers import IMAGE, media_server

# (address, why it is refused): RFC 6890's special-purpose registries and the IPv6 forms of IPv4.
REFUSED = [
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("100.64.0.1", "not globally routable"),  # shared address space (carrier NAT)
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),  # limited broadcast
    ("198.18.0.1", "private"),  # benchmarking
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fd12:3456::1", "private"),
    ("ff02::1", "multicast"),
    ("fec0::1", "site-local"),
    ("::ffff:127.0.0.1", "loopback (IPv4 127.0.0.1 inside IPv6)"),
    ("::ffff:169.254.169.254", "link-local (IPv4 169.254.169.254 inside IPv6)"),
    ("::ffff:10.0.0.1", "private (IPv4 10.0.0.1 inside IPv6)"),
    ("2002:7f00:1::", "loopback (IPv4 127.0.0.1 inside IPv6)"),  # 6to4
    ("64:ff9b::a9fe:a9fe", "link-local (IPv4 169.254.169.254 inside IPv6)"),  # NAT64
    ("::127.0.0.1", "reserved"),  # IPv4-compatible (deprecated)
]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::"]


@pytest.mark.parametrize(("address", "why"), REFUSED)
def test_non_public_addresses_are_refused(address: str, why: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


def _resolver(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any connection attempt fail the test: a refusal must come before connecting."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"connected to {args}")

    monkeypatch.setattr(media_fetch.socket, "create_connection", refuse)


@pytest.mark.usefixtures("no_connections")
def test_every_resolved_address_is_checked_before_connecting() -> None:
    resolver = _resolver(
        {
            "metadata.test": ["169.254.169.254"],
            "mixed.test": ["8.8.8.8", "10.0.0.1"],  # one private answer is enough to refuse
            "v6.test": ["2606:4700:4700::1111", "::ffff:127.0.0.1"],
            "public.test": ["8.8.8.8"],
        }
    )
    policy = MediaFetchPolicy()
    for url, message in [
        ("http://metadata.test/latest/meta-data/", "169.254.169.254, a link-local address"),
        ("http://mixed.test/a.png", "10.0.0.1, a private address"),
        ("https://v6.test/a.png", "::ffff:127.0.0.1, a loopback (IPv4 127.0.0.1 inside IPv6) address"),
    ]:
        with pytest.raises(MediaFetchError, match="serve.allow_private_media_urls") as info:
            fetch_media(url, policy, resolver)
        assert message in str(info.value)
    with pytest.raises(MediaFetchError, match="'public.test' is not in serve.allowed_media_domains"):
        fetch_media("http://public.test/a.png", MediaFetchPolicy(allowed_domains=("images.test",)), resolver)
    # The widening key lets every address through; the domain list still narrows the hosts.
    widened = MediaFetchPolicy(allow_private=True)
    assert checked_addresses("mixed.test", 80, widened, resolver) == ["8.8.8.8", "10.0.0.1"]
    with pytest.raises(MediaFetchError, match="not an http"):
        fetch_media("ftp://public.test/a.png", policy, resolver)
    with pytest.raises(MediaFetchError, match="bad port"):
        fetch_media("http://public.test:99999/a.png", policy, resolver)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "2130706433", "0x7f.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_loopback_spellings_never_reach_the_trap(host: str) -> None:
    """The real resolver: each spelling of loopback resolves to it and is refused; the trap server
    listening there records no request."""
    with media_server() as trap:
        url = trap.url("/latest/meta-data/", host=host)
        with pytest.raises(MediaFetchError, match="loopback"):
            fetch_media(url, MediaFetchPolicy())
        assert trap.requests == []


def test_the_widening_key_fetches_from_loopback() -> None:
    with media_server() as source:
        assert fetch_media(source.url("/image.png"), MediaFetchPolicy(allow_private=True)) == IMAGE
        assert source.requests == ["/image.png"]


def test_a_redirect_to_a_private_address_is_refused_at_the_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    """An allowed host (here 127.0.0.1, counted as public for this test only) redirects to a name that
    resolves to 127.0.0.2: the hop is refused before connecting, the trap there records nothing."""
    real = media_fetch.address_refusal
    public = ipaddress.ip_address("127.0.0.1")
    monkeypatch.setattr(media_fetch, "address_refusal", lambda a: None if a == public else real(a))
    with media_server("127.0.0.1") as front, media_server("127.0.0.2") as trap:
        resolver = _resolver({"images.test": ["127.0.0.1"], "internal.test": ["127.0.0.2"]})
        hop = trap.url("/secret", host="internal.test")
        url = front.url(f"/redirect?to={hop}", host="images.test")
        with pytest.raises(MediaFetchError, match="'internal.test' resolves to 127.0.0.2, a loopback address"):
            fetch_media(url, MediaFetchPolicy(), resolver)
        # With private addresses allowed, the domain list refuses the hop instead.
        with pytest.raises(MediaFetchError, match="'internal.test' is not in serve.allowed_media_domains"):
            fetch_media(url, MediaFetchPolicy(allowed_domains=("images.test",), allow_private=True), resolver)
        assert len(front.requests) == 2 and trap.requests == []
        # Allowed on both counts, the same redirect is followed.
        fetch_media(url, MediaFetchPolicy(allow_private=True), resolver)
        assert trap.requests == ["/secret"]


def test_redirects_are_bounded_and_relative_locations_resolve() -> None:
    with media_server() as source:
        once = source.url("/redirect?to=/image.png")
        twice = source.url(f"/redirect?to={once}")
        policy = MediaFetchPolicy(allow_private=True, max_redirects=2)
        assert fetch_media(twice, policy) == IMAGE
        with pytest.raises(MediaFetchError, match="more than serve.max_media_redirects=1 times"):
            fetch_media(twice, MediaFetchPolicy(allow_private=True, max_redirects=1))


def test_a_slow_drip_is_cut_at_the_read_timeout() -> None:
    with media_server() as source:
        policy = MediaFetchPolicy(allow_private=True, read_timeout_s=0.5)
        with pytest.raises(MediaFetchError, match=r"not received within serve.media_read_timeout_s=0.5"):
            fetch_media(source.url("/drip"), policy)


def test_oversized_bodies_are_refused() -> None:
    with media_server(big_bytes=1000) as source:
        policy = MediaFetchPolicy(allow_private=True, max_bytes=1000)
        with pytest.raises(MediaFetchError, match="more than serve.max_media_bytes=1000 bytes"):
            fetch_media(source.url("/big"), policy)  # no Content-Length: cut while reading
        with pytest.raises(MediaFetchError, match=f"is {len(IMAGE)} bytes, more than serve.max_media_bytes=1000"):
            fetch_media(source.url("/image.png"), policy)  # refused on its Content-Length


def test_http_errors_and_unreachable_hosts() -> None:
    with media_server() as source:
        missing = source.url("/redirect")  # no ?to=: the handler fails, http.server answers 500 or drops it
        with pytest.raises(MediaFetchError, match="cannot fetch image"):
            fetch_media(missing, MediaFetchPolicy(allow_private=True))
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with pytest.raises(MediaFetchError, match="cannot connect to image host '127.0.0.1'"):
        fetch_media(f"http://127.0.0.1:{port}/a.png", MediaFetchPolicy(allow_private=True))
