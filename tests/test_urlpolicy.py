"""The URL policy, table-driven. `check_url` only classifies: no test here sends a request or
asks a real DNS server (except for "localhost", which the machine resolves itself). URLs are
built from hosts with `http_url` so that no fetchable non-loopback URL stands in the test code."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from pipeline.ingest.urlpolicy import NetworkPolicy, ascii_url, check_url, check_urls
from pipeline.spec.fates import Fate


def http_url(host: str, path: str = "/a.jpg", scheme: str = "http") -> str:
    return f"{scheme}://{host}{path}"


def no_dns(host: str) -> list[str]:
    raise AssertionError(f"looked up {host!r}: no lookup was expected")


FAKE_DNS = {
    "intranet.test": ["10.1.2.3"],
    "metadata.test": ["169.254.169.254"],
    "loop.test": ["127.0.0.1"],
    "v6loop.test": ["::1"],
    "ula.test": ["fd00::5"],
    "cdn.test": ["93.184.216.34"],
    "split.test": ["93.184.216.34", "192.168.0.7"],
    "v6.test": ["2606:4700::1111"],
    "dual.test": ["93.184.216.34", "2606:4700::1111"],
    "nowhere.test": [],
}


def fake_dns(host: str) -> list[str]:
    return FAKE_DNS[host]  # an unknown name is a KeyError: the test asked for a lookup it did not plan


def private_message(host: str, address: str) -> str:
    return f"host {host}: {address} is a private, loopback or link-local address"


# --- literal addresses: classified without DNS -----------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["10.0.0.1", "172.16.5.4", "172.31.255.255", "192.168.1.1", "169.254.169.254", "127.0.0.1", "127.9.9.9",
     "0.0.0.0", "100.64.0.1", "192.0.2.1", "224.0.0.1", "255.255.255.255",
     "[::1]", "[::]", "[fc00::1]", "[fd12::1]", "[fe80::1]", "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]",
     "[::ffff:169.254.169.254]", "[ff02::1]"],
)  # fmt: skip
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_private_literal_addresses_are_blocked_without_dns(host, scheme):
    verdict = check_url(http_url(f"{host}:8080", scheme=scheme), policy=NetworkPolicy(), resolver=no_dns)
    assert verdict is not None
    assert verdict.fate == Fate.BLOCKED
    bare = host.strip("[]")
    assert verdict.error == private_message(bare, bare)


@pytest.mark.parametrize(
    "host", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "[2606:4700::1111]", "[::ffff:8.8.8.8]"]
)
@pytest.mark.parametrize("suffix", ["/a.jpg", ":8443/a.jpg?x=1", "/"])
def test_public_literal_addresses_pass_without_dns(host, suffix):
    assert check_url(http_url(host, suffix, scheme="https"), policy=NetworkPolicy(), resolver=no_dns) is None


# --- names: every address they resolve to must be public ---------------------------------------------


@pytest.mark.parametrize(
    ("host", "blocked_by"),
    [
        ("intranet.test", "10.1.2.3"),
        ("metadata.test", "169.254.169.254"),
        ("loop.test", "127.0.0.1"),
        ("v6loop.test", "::1"),
        ("ula.test", "fd00::5"),
        ("split.test", "192.168.0.7"),  # one public and one private address: blocked
        ("cdn.test", None),
        ("v6.test", None),
        ("dual.test", None),
        ("nowhere.test", None),  # does not resolve: allowed here, the download fails later
    ],
)
def test_names_are_judged_by_every_address_they_resolve_to(host, blocked_by):
    verdict = check_url(http_url(host), policy=NetworkPolicy(), resolver=fake_dns)
    if blocked_by is None:
        assert verdict is None
    else:
        assert verdict is not None
        assert verdict.fate == Fate.BLOCKED
        assert verdict.error == private_message(host, blocked_by)


def test_names_are_looked_up_lowercased_and_without_port_or_credentials():
    asked: list[str] = []

    def resolver(host: str) -> list[str]:
        asked.append(host)
        return ["10.1.2.3"]

    verdict = check_url(http_url("user:pw@InTraNet.TEST:8080"), policy=NetworkPolicy(), resolver=resolver)
    assert asked == ["intranet.test"]
    assert verdict is not None and verdict.fate == Fate.BLOCKED


def test_localhost_is_blocked_by_the_real_resolver():
    verdict = check_url(http_url("localhost:8000"), policy=NetworkPolicy())
    assert verdict is not None
    assert verdict.fate == Fate.BLOCKED
    assert verdict.error.startswith("host localhost: ") and verdict.error.endswith(
        " is a private, loopback or link-local address"
    )


# --- syntax and scheme: no network needed, the same whatever the private-network setting -------------


@pytest.mark.parametrize(
    ("url", "fate", "error"),
    [
        (None, Fate.INVALID_INPUT, "empty url"),
        (12345, Fate.INVALID_INPUT, "empty url"),
        ("", Fate.INVALID_INPUT, "empty url"),
        ("   ", Fate.INVALID_INPUT, "empty url"),
        ("\t\n", Fate.INVALID_INPUT, "empty url"),
        ("not a url", Fate.INVALID_INPUT, "not a url: it contains the character ' '"),
        ("notaurl", Fate.INVALID_INPUT, "not a url: no scheme"),
        (http_url("cdn.test", "/a b.jpg"), Fate.INVALID_INPUT, "not a url: it contains the character ' '"),
        (http_url("cdn.test", "/a.jpg\x00"), Fate.INVALID_INPUT, "not a url: it contains the character '\\x00'"),
        (http_url("cdn.test", "/\x1b[31m.jpg"), Fate.INVALID_INPUT, "not a url: it contains the character '\\x1b'"),
        (http_url("cdn.test", "/a\ufffd.jpg"), Fate.INVALID_INPUT, "not a url: it was not valid UTF-8 in the input"),
        ("//cdn.test/a.jpg", Fate.INVALID_INPUT, "not a url: no scheme"),
        ("http://", Fate.INVALID_INPUT, "not a url: no host"),
        ("http:///a.jpg", Fate.INVALID_INPUT, "not a url: no host"),
        ("http://[::1", Fate.INVALID_INPUT, "not a url: Invalid IPv6 URL"),
        (http_url("host.test:99999"), Fate.INVALID_INPUT, "not a url: Port out of range 0-65535"),
        (http_url("host.test:abc"), Fate.INVALID_INPUT, "not a url: Port could not be cast to integer value as 'abc'"),
        ("file:///etc/passwd", Fate.BLOCKED, "scheme 'file' is not allowed (http and https only)"),
        ("FILE:///etc/passwd", Fate.BLOCKED, "scheme 'file' is not allowed (http and https only)"),
        ("ftp://x.test/a.jpg", Fate.BLOCKED, "scheme 'ftp' is not allowed (http and https only)"),
        ("data:image/png;base64,xx", Fate.BLOCKED, "scheme 'data' is not allowed (http and https only)"),
        ("javascript:alert(1)", Fate.BLOCKED, "scheme 'javascript' is not allowed (http and https only)"),
        ("gopher://x.test/1", Fate.BLOCKED, "scheme 'gopher' is not allowed (http and https only)"),
        ("s3://bucket/a.jpg", Fate.BLOCKED, "scheme 's3' is not allowed (http and https only)"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("allow_private", [False, True])
def test_syntax_and_scheme_rules_hold_even_when_private_networks_are_allowed(url, fate, error, allow_private):
    verdict = check_url(url, policy=NetworkPolicy(allow_private), resolver=no_dns)
    assert verdict is not None
    assert verdict.fate == fate
    assert verdict.error == error


# --- allow_private_networks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [http_url("10.0.0.1"), http_url("127.0.0.1:8000"), http_url("[::1]:8000"), http_url("169.254.169.254"),
     http_url("intranet.test"), http_url("localhost:8000"), "HTTP://127.0.0.1/A.JPG", f"  {http_url('192.168.1.1')}  ",
     http_url("8.8.8.8", scheme="https")],
)  # fmt: skip
def test_allow_private_networks_opens_private_hosts_without_any_lookup(url):
    assert check_url(url, policy=NetworkPolicy(True), resolver=no_dns) is None


@pytest.mark.parametrize(
    ("url", "blocked"),
    [
        (http_url("8.8.8.8", "/A.JPG", scheme="HTTPS"), False),
        (f"  {http_url('10.0.0.1')}  ", True),
        ("HtTp://127.0.0.1/", True),
    ],
)
def test_case_and_surrounding_space_do_not_change_the_verdict(url, blocked):
    verdict = check_url(url, policy=NetworkPolicy(), resolver=no_dns)
    assert (verdict is not None and verdict.fate == Fate.BLOCKED) == blocked


# --- many URLs ---------------------------------------------------------------------------------------


def test_check_urls_resolves_each_distinct_host_once_and_keeps_the_order():
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    def counting(host: str) -> list[str]:
        with lock:
            calls[host] += 1
        return FAKE_DNS[host]

    table = [  # (url, expected fate or None for allowed)
        (http_url("cdn.test", "/0.jpg"), None),
        (http_url("intranet.test", "/1.jpg"), Fate.BLOCKED),
        (http_url("CDN.test", "/2.jpg"), None),
        ("ftp://cdn.test/3.jpg", Fate.BLOCKED),
        (http_url("intranet.test:8080", "/4.jpg"), Fate.BLOCKED),
        (http_url("8.8.8.8", "/5.jpg"), None),
        (None, Fate.INVALID_INPUT),
        (http_url("split.test", "/7.jpg"), Fate.BLOCKED),
        (http_url("nowhere.test", "/8.jpg"), None),
        (http_url("10.0.0.1", "/9.jpg"), Fate.BLOCKED),
        (http_url("v6.test", "/10.jpg", scheme="https"), None),
        ("http://[::1", Fate.INVALID_INPUT),
    ] * 5
    verdicts = check_urls([u for u, _ in table], policy=NetworkPolicy(), resolver=counting, threads=4)
    assert [v.fate if v else None for v in verdicts] == [fate for _, fate in table]
    assert all(v.error for v in verdicts if v is not None)
    assert calls == Counter(
        {"cdn.test": 1, "intranet.test": 1, "split.test": 1, "nowhere.test": 1, "v6.test": 1}
    )


@pytest.mark.parametrize("allow_private", [False, True])
def test_check_urls_of_nothing_is_nothing(allow_private):
    assert check_urls([], policy=NetworkPolicy(allow_private), resolver=no_dns) == []


def test_check_url_agrees_with_check_urls():
    urls = [http_url(h) for h in FAKE_DNS] + ["ftp://x.test/a", "", http_url("10.0.0.1")]
    one_by_one = [check_url(u, policy=NetworkPolicy(), resolver=fake_dns) for u in urls]
    assert check_urls(urls, policy=NetworkPolicy(), resolver=fake_dns) == one_by_one


# --- denied and allowed networks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "address", "refused"),
    [
        (NetworkPolicy(), "8.8.8.8", None),
        (NetworkPolicy(), "10.1.2.3", "10.1.2.3 is a private, loopback or link-local address"),
        (NetworkPolicy(allowed_networks=("10.1.0.0/16",)), "10.1.2.3", None),
        (NetworkPolicy(allowed_networks=("10.1.0.0/16",)), "10.2.0.1", "10.2.0.1 is a private, loopback or link-local address"),
        (NetworkPolicy(True, denied_networks=("10.0.0.0/8",)), "10.1.2.3", "10.1.2.3 is in denied network 10.0.0.0/8"),
        (NetworkPolicy(True, denied_networks=("10.0.0.0/8",)), "192.168.0.1", None),
        (NetworkPolicy(denied_networks=("8.8.8.0/24",)), "8.8.8.8", "8.8.8.8 is in denied network 8.8.8.0/24"),
        (NetworkPolicy(allowed_networks=("10.0.0.0/8",), denied_networks=("10.9.0.0/16",)), "10.9.1.1", "10.9.1.1 is in denied network 10.9.0.0/16"),
        (NetworkPolicy(denied_networks=("10.0.0.0/8",)), "::ffff:10.1.1.1", "::ffff:10.1.1.1 is in denied network 10.0.0.0/8"),
        (NetworkPolicy(allowed_networks=("fd00::/8",)), "fd12::1", None),
        (NetworkPolicy(), "64:ff9b::a00:1", "64:ff9b::a00:1 is a private, loopback or link-local address"),
        (NetworkPolicy(), "2002:a00:1::", "2002:a00:1:: is a private, loopback or link-local address"),
        (NetworkPolicy(), "64:ff9b::808:808", None),
        (NetworkPolicy(denied_networks=("10.0.0.0/8",)), "64:ff9b::a00:1", "64:ff9b::a00:1 is in denied network 10.0.0.0/8"),
        (NetworkPolicy(True, denied_networks=("127.0.0.2/32",)), "127.0.0.1", None),
        (NetworkPolicy(True, denied_networks=("127.0.0.2/32",)), "127.0.0.2", "127.0.0.2 is in denied network 127.0.0.2/32"),
    ],
)  # fmt: skip
def test_a_denied_network_wins_and_an_allowed_one_opens_only_itself(policy, address, refused):
    assert policy.refusal(address) == refused


def test_a_denied_network_makes_names_resolve_even_when_private_networks_are_allowed():
    asked = []

    def resolver(host):
        asked.append(host)
        return ["10.1.1.1"]

    policy = NetworkPolicy(True, denied_networks=("10.0.0.0/8",))
    verdict = check_url(http_url("intranet.test"), policy=policy, resolver=resolver)
    assert asked == ["intranet.test"]
    assert verdict is not None and verdict.fate == Fate.BLOCKED
    assert verdict.error == "host intranet.test: 10.1.1.1 is in denied network 10.0.0.0/8"
    assert check_url(http_url("intranet.test"), policy=NetworkPolicy(True), resolver=no_dns) is None


# --- non-ASCII URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        (http_url("cdn.test", "/a.jpg?x=1#top"), http_url("cdn.test", "/a.jpg?x=1#top")),
        (f"  {http_url('cdn.test', '/a%20b.jpg')}  ", http_url("cdn.test", "/a%20b.jpg")),
        (http_url("cdn.test", "/café/naïve.jpg"), http_url("cdn.test", "/caf%C3%A9/na%C3%AFve.jpg")),
        (http_url("cdn.test", "/a.jpg?q=日本"), http_url("cdn.test", "/a.jpg?q=%E6%97%A5%E6%9C%AC")),
        (
            http_url("bücher.test:8443", "/ä.png", "https"),
            http_url("xn--bcher-kva.test:8443", "/%C3%A4.png", "https"),
        ),
        ("http://üser:pä@cdn.test/a.jpg", "http://%C3%BCser:p%C3%A4@cdn.test/a.jpg"),
        ("http://[::1]:8080/é", "http://[::1]:8080/%C3%A9"),
    ],
)
def test_non_ascii_urls_are_sent_as_a_browser_sends_them(url, sent):
    assert ascii_url(url) == sent
    assert check_url(url, policy=NetworkPolicy(True), resolver=no_dns) is None


def test_a_host_that_idna_cannot_encode_is_invalid_input():
    verdict = check_url("http://" + "ü" * 70 + ".test/a.jpg", policy=NetworkPolicy(True), resolver=no_dns)
    assert verdict is not None and verdict.fate == Fate.INVALID_INPUT
    assert verdict.error.startswith("not a url: its host cannot be written in IDNA: ")
