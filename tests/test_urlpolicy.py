"""The URL policy, table-driven. `check_url` only classifies: no test here sends a request or
asks a real DNS server (except for "localhost", which the machine resolves itself). URLs are
built from hosts with `http_url` so that no fetchable non-loopback URL stands in the test code."""

from __future__ import annotations

import pytest

from pipeline.fates import Fate
from pipeline.urlpolicy import check_url, check_urls


def http_url(host: str, path: str = "/a.jpg", scheme: str = "http") -> str:
    return f"{scheme}://{host}{path}"


def no_dns(host: str) -> list[str]:
    raise AssertionError(f"looked up {host!r}: literal addresses need no DNS")


FAKE_DNS = {
    "intranet.test": ["10.1.2.3"],
    "metadata.test": ["169.254.169.254"],
    "cdn.test": ["93.184.216.34"],
    "split.test": ["93.184.216.34", "192.168.0.7"],
    "v6.test": ["2606:4700::1111"],
    "nowhere.test": [],
}


@pytest.mark.parametrize(
    "host",
    ["10.0.0.1", "172.16.5.4", "172.31.255.255", "192.168.1.1", "169.254.169.254", "127.0.0.1", "127.9.9.9",
     "0.0.0.0", "100.64.0.1", "[::1]", "[fc00::1]", "[fd12::1]", "[fe80::1]", "[::ffff:127.0.0.1]", "[::]"],
)  # fmt: skip
def test_private_literal_addresses_are_blocked(host):
    verdict = check_url(f"http://{host}/a.jpg", allow_private_networks=False, resolver=no_dns)
    assert verdict is not None and verdict.fate == Fate.BLOCKED and "private" in verdict.error


@pytest.mark.parametrize("host", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "[2606:4700::1111]"])
def test_public_literal_addresses_pass(host):
    assert check_url(f"https://{host}:8443/a.jpg?x=1", allow_private_networks=False, resolver=no_dns) is None


@pytest.mark.parametrize(
    ("host", "blocked"),
    [("intranet.test", True), ("metadata.test", True), ("split.test", True), ("cdn.test", False),
     ("v6.test", False), ("nowhere.test", False)],
)  # fmt: skip
def test_names_are_judged_by_every_address_they_resolve_to(host, blocked):
    verdict = check_url(f"http://{host}/img.jpg", allow_private_networks=False, resolver=FAKE_DNS.__getitem__)
    assert (verdict is not None and verdict.fate == Fate.BLOCKED) == blocked


def test_localhost_is_blocked_by_the_real_resolver():
    verdict = check_url("http://localhost:8000/a.jpg", allow_private_networks=False)
    assert verdict is not None and verdict.fate == Fate.BLOCKED


@pytest.mark.parametrize(
    ("url", "fate"),
    [(None, Fate.INVALID_INPUT), ("", Fate.INVALID_INPUT), ("   ", Fate.INVALID_INPUT),
     ("not a url", Fate.INVALID_INPUT), ("http://", Fate.INVALID_INPUT),
     ("//cdn.test/a.jpg", Fate.INVALID_INPUT),
     ("http://[::1", Fate.INVALID_INPUT), (http_url("cdn.test:99999"), Fate.INVALID_INPUT),
     ("file:///etc/passwd", Fate.BLOCKED), ("ftp://cdn.test/a.jpg", Fate.BLOCKED),
     ("data:image/png;base64,AAAA", Fate.BLOCKED), ("javascript:alert(1)", Fate.BLOCKED),
     (12345, Fate.INVALID_INPUT)],
)  # fmt: skip
@pytest.mark.parametrize("allow_private", [False, True])
def test_syntax_and_scheme_rules_hold_even_when_private_networks_are_allowed(url, fate, allow_private):
    verdict = check_url(url, allow_private_networks=allow_private, resolver=FAKE_DNS.__getitem__)
    assert verdict is not None and verdict.fate == fate and verdict.error


@pytest.mark.parametrize("url", [http_url("10.0.0.1"), http_url("intranet.test"), "HTTP://127.0.0.1/A.JPG"])
def test_allow_private_networks_opens_private_hosts(url):
    assert check_url(url, allow_private_networks=True, resolver=no_dns) is None


def test_check_urls_resolves_each_host_once_and_keeps_the_order():
    calls: list[str] = []

    def counting(host: str) -> list[str]:
        calls.append(host)
        return FAKE_DNS[host]

    hosts = ["cdn.test", "intranet.test", "cdn.test", None, "intranet.test", "8.8.8.8"]
    urls = [http_url(h, f"/{i}.jpg") if h else "ftp://x/4" for i, h in enumerate(hosts)]
    verdicts = check_urls(urls, allow_private_networks=False, resolver=counting)
    assert sorted(calls) == ["cdn.test", "intranet.test"]
    assert [v.fate if v else None for v in verdicts] == [
        None,
        Fate.BLOCKED,
        None,
        Fate.BLOCKED,
        Fate.BLOCKED,
        None,
    ]
