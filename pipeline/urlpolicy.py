"""Which URLs may be fetched at all, decided before any request is sent.

Web URL lists contain `file://` paths, intranet hosts and cloud metadata addresses
(169.254.169.254). A crawler that fetches them leaks or attacks its own network, so by default
only http(s) URLs whose host is a public address are fetched; `allow_private_networks` opens
private, loopback and link-local hosts (the tests serve images on 127.0.0.1).

Names are resolved here and every address they resolve to must be public. This does not stop a
DNS answer that changes between this check and the download, nor a redirect to a private
address; those need the check inside the HTTP client.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from pipeline.fates import Fate

Resolver = Callable[[str], list[str]]

ALLOWED_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Verdict:
    """Why a URL is not fetched: the fate it gets and a message for its `error`."""

    fate: Fate
    error: str


def resolve(host: str) -> list[str]:
    """All addresses `host` resolves to; [] when it does not resolve (the download fails later)."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except (OSError, UnicodeError):
        return []


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


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
    return None


def check_url(url: object, allow_private_networks: bool, resolver: Resolver = resolve) -> Verdict | None:
    """None when the URL may be fetched, else the verdict."""
    return check_urls([url], allow_private_networks, resolver)[0]


def check_urls(
    urls: Iterable[object], allow_private_networks: bool, resolver: Resolver = resolve, threads: int = 32
) -> list[Verdict | None]:
    """`check_url` for many URLs, resolving each distinct host once and in parallel."""
    urls = list(urls)
    syntax = [check_syntax(u) for u in urls]
    if allow_private_networks:
        return syntax
    hosts = sorted({host_of(str(u)) for u, v in zip(urls, syntax, strict=True) if v is None} - {None})
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(hosts)))) as pool:
        verdict_of = dict(
            zip(hosts, pool.map(lambda h: _address_verdict(h, _addresses(h, resolver)), hosts), strict=True)
        )
    return [v if v is not None else verdict_of[host_of(str(u))] for u, v in zip(urls, syntax, strict=True)]


def _addresses(host: str, resolver: Resolver) -> list[str]:
    literal = host.strip("[]")
    try:
        ipaddress.ip_address(literal.split("%")[0])
        return [literal]
    except ValueError:
        return resolver(host)


def _address_verdict(host: str, addresses: list[str]) -> Verdict | None:
    private = [a for a in addresses if not is_public_address(a)]
    if private:
        reason = f"host {host} is a private, loopback or link-local address ({private[0]})"
        return Verdict(Fate.BLOCKED, reason)
    return None
