"""Which URLs and addresses may be fetched at all, decided before any request is sent.

Web URL lists contain `file://` paths, intranet hosts and cloud metadata addresses
(169.254.169.254). A crawler that fetches them leaks or attacks its own network, so by default
only http(s) URLs whose host is a public address are fetched. The job's `NetworkPolicy` opens
private, loopback and link-local hosts (`allow_private_networks`; the tests serve images on
127.0.0.1) or chosen networks only (`allowed_networks`), and closes networks whatever else says
(`denied_networks`).

Here names are resolved once per host, before the download, so that a list of blocked rows costs no
request. The same policy is enforced again on every connection the downloader opens, redirects
included, against the address it really connects to (`pipeline.ingest.fetch_guard`): a DNS answer that
changes in between, or a redirect to an intranet host, is caught there.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from pipeline.spec.config import DownloadSpec
from pipeline.spec.fates import Fate

Resolver = Callable[[str], list[str]]

ALLOWED_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Verdict:
    """Why a URL is not fetched: the fate it gets and a message for its `error`."""

    fate: Fate
    error: str


@dataclass(frozen=True)
class NetworkPolicy:
    """Which addresses may be connected to. A denied network wins over everything; an allowed network
    or `allow_private_networks` opens non-public addresses; public addresses are open by default."""

    allow_private_networks: bool = False
    allowed_networks: tuple[str, ...] = ()
    denied_networks: tuple[str, ...] = ()

    @classmethod
    def of(cls, download: DownloadSpec) -> NetworkPolicy:
        return cls(download.allow_private_networks, download.allowed_networks, download.denied_networks)

    @property
    def needs_addresses(self) -> bool:
        """False when no address can be refused, so names need not be resolved before the download."""
        return not (self.allow_private_networks and not self.denied_networks)

    def refusal(self, address: str) -> str | None:
        """Why `address` may not be connected to, or None when it may."""
        ip = _unmapped(address)
        for network in self.denied_networks:
            if ip in ipaddress.ip_network(network, strict=False):
                return f"{address} is in denied network {network}"
        if any(ip in ipaddress.ip_network(n, strict=False) for n in self.allowed_networks):
            return None
        if self.allow_private_networks or is_public_address(address):
            return None
        return f"{address} is a private, loopback or link-local address"


def resolve(host: str) -> list[str]:
    """All addresses `host` resolves to; [] when it does not resolve (the download fails later)."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except (OSError, UnicodeError):
        return []


def is_public_address(address: str) -> bool:
    ip = _unmapped(address)
    return ip.is_global and not ip.is_multicast


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _unmapped(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address an IPv6 address carries, where it does: IPv4-mapped (::ffff:10.0.0.1), 6to4
    (2002:a00:1::) and NAT64 (64:ff9b::a00:1) reach that IPv4 host, so they are judged as it is."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if not isinstance(ip, ipaddress.IPv6Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def host_of(url: str) -> str | None:
    """The host of an http(s) URL, or None when the URL is not one (see `check_syntax`)."""
    try:
        return urlsplit(url.strip()).hostname
    except ValueError:
        return None


def check_syntax(url: object) -> Verdict | None:
    """Rules that need no network: present, parseable, http(s), with a host."""
    if not isinstance(url, str) or not url.strip():
        return Verdict(Fate.INVALID_INPUT, "empty url")
    if "\ufffd" in url:
        return Verdict(Fate.INVALID_INPUT, "not a url: it was not valid UTF-8 in the input")
    stripped = url.strip()
    if " " in stripped or not stripped.isprintable():  # both in C: the common URL costs no Python loop
        odd = next(c for c in stripped if c.isspace() or not c.isprintable())
        return Verdict(Fate.INVALID_INPUT, f"not a url: it contains the character {odd!r}")
    try:
        parts = urlsplit(url.strip())
        hostname = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as err:
        return Verdict(Fate.INVALID_INPUT, f"not a url: {err}")
    if not parts.scheme:
        return Verdict(Fate.INVALID_INPUT, "not a url: no scheme")
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return Verdict(Fate.BLOCKED, f"scheme {parts.scheme!r} is not allowed (http and https only)")
    if not hostname:
        return Verdict(Fate.INVALID_INPUT, "not a url: no host")
    try:
        ascii_url(url)
    except UnicodeError as err:
        return Verdict(Fate.INVALID_INPUT, f"not a url: its host cannot be written in IDNA: {err}")
    return None


# Every printable ASCII character but the space stays as it is: only what is not ASCII is encoded.
_KEEP = "".join(chr(c) for c in range(33, 127))


def ascii_url(url: str) -> str:
    """The URL as a browser sends it: a non-ASCII host in IDNA, any other non-ASCII character
    percent-encoded as UTF-8. urllib sends ASCII only and fails the rest; web lists hold such URLs.
    Raises UnicodeError when the host cannot be encoded (`check_syntax` makes that `invalid_input`)."""
    url = url.strip()
    if url.isascii():
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host.encode("idna").decode("ascii") if not host.isascii() else host
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        netloc = f"{quote(userinfo, safe=_KEEP)}@{netloc}"
    path, query, fragment = (quote(p, safe=_KEEP) for p in (parts.path, parts.query, parts.fragment))
    return urlunsplit((parts.scheme, netloc, path, query, fragment))


def check_url(url: object, policy: NetworkPolicy, resolver: Resolver = resolve) -> Verdict | None:
    """None when the URL may be fetched, else the verdict."""
    return check_urls([url], policy, resolver)[0]


def check_urls(
    urls: Iterable[object], policy: NetworkPolicy, resolver: Resolver = resolve, threads: int = 32
) -> list[Verdict | None]:
    """`check_url` for many URLs, resolving each distinct host once and in parallel."""
    urls = list(urls)
    syntax = [check_syntax(u) for u in urls]
    if not policy.needs_addresses:
        return syntax
    hosts = sorted({host_of(str(u)) for u, v in zip(urls, syntax, strict=True) if v is None} - {None})
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(hosts)))) as pool:
        verdicts = pool.map(lambda h: address_verdict(h, addresses_of(h, resolver), policy), hosts)
        verdict_of = dict(zip(hosts, verdicts, strict=True))
    return [v if v is not None else verdict_of[host_of(str(u))] for u, v in zip(urls, syntax, strict=True)]


def addresses_of(host: str, resolver: Resolver = resolve) -> list[str]:
    """The host's address when it is one (no lookup), else every address it resolves to."""
    literal = host.strip("[]")
    try:
        ipaddress.ip_address(literal.split("%")[0])
        return [literal]
    except ValueError:
        return resolver(host)


def address_verdict(host: str, addresses: list[str], policy: NetworkPolicy) -> Verdict | None:
    """BLOCKED when the policy refuses any of the host's addresses: a name is as safe as its worst."""
    for address in addresses:
        refusal = policy.refusal(address)
        if refusal is not None:
            return Verdict(Fate.BLOCKED, f"host {host}: {refusal}")
    return None
