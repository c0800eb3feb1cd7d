"""The pure half of gateway.upstream: proxy URLs and no_proxy matching."""

from __future__ import annotations

import base64

import pytest

from gateway.upstream import NoProxy, ProxyURL, parseNoProxy, parseProxyURL

# -- parseProxyURL -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://proxy.example:3128", ProxyURL("http", "proxy.example", 3128)),
        ("http://proxy.example", ProxyURL("http", "proxy.example", 80)),
        ("https://proxy.example", ProxyURL("https", "proxy.example", 443)),
        ("HTTPS://Proxy.Example:8443/", ProxyURL("https", "proxy.example", 8443)),
        ("http://proxy.example.:3128", ProxyURL("http", "proxy.example", 3128)),
        ("  http://10.0.0.1:3128  ", ProxyURL("http", "10.0.0.1", 3128)),
        ("http://[::1]:3128", ProxyURL("http", "::1", 3128)),
        ("http://[2001:DB8::1]", ProxyURL("http", "2001:db8::1", 80)),
        ("http://proxy.example:", ProxyURL("http", "proxy.example", 80)),
        ("http://user:pass@proxy:3128", ProxyURL("http", "proxy", 3128, "user", "pass")),
        ("http://user@proxy:3128", ProxyURL("http", "proxy", 3128, "user", None)),
        ("http://user:@proxy:3128", ProxyURL("http", "proxy", 3128, "user", "")),
        ("http://:pw@proxy:3128", ProxyURL("http", "proxy", 3128, "", "pw")),
        ("http://@proxy:3128", ProxyURL("http", "proxy", 3128, None, None)),
        (
            "http://us%40er:p%3Aa%2Fs%23s%40@proxy:3128",
            ProxyURL("http", "proxy", 3128, "us@er", "p:a/s#s@"),
        ),
        ("http://u:p:w@proxy:3128", ProxyURL("http", "proxy", 3128, "u", "p:w")),
        ("http://u:p@w@proxy:3128", ProxyURL("http", "proxy", 3128, "u", "p@w")),
        (
            "http://j%C3%BCrgen:p%C3%A4ss@proxy:3128",
            ProxyURL("http", "proxy", 3128, "jürgen", "päss"),
        ),
    ],
)
def test_parseProxyURL(text: str, expected: ProxyURL) -> None:
    parsed = parseProxyURL(text)
    assert parsed == expected
    assert parsed.password == expected.password


SECRET = "s3cr3tPW"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no scheme"),
        ("proxy.example:3128", "no scheme"),
        (f"user:{SECRET}@proxy:3128", "no scheme"),
        ("socks5://proxy:1080", "unsupported upstream proxy scheme 'socks5'"),
        ("ftp://proxy", "unsupported"),
        ("http://", "missing host"),
        (f"http://user:{SECRET}@", "missing host"),
        (f"http://user:{SECRET}@:3128", "missing host"),
        ("http://proxy:0", "port"),
        ("http://proxy:65536", "port"),
        ("http://proxy:http", "port"),
        (f"http://user:{SECRET}@proxy:99999", "port"),
        (f"http://user:{SECRET[:4]}:{SECRET[4:]}x@[::1", "unclosed"),
        (f"http://user:{SECRET}@[::1]x", "junk after"),
        (f"http://user:{SECRET}@[zz]:80", "not an IPv6 address"),
        (f"http://user:{SECRET}@proxy:3128/path", "path, query or fragment"),
        (f"http://user:{SECRET}@proxy:3128?q=1", "path, query or fragment"),
        (f"http://user:{SECRET}@proxy:3128#frag", "path, query or fragment"),
        # an unencoded '/' in the password cuts the authority short...
        (f"http://user:{SECRET[:4]}/{SECRET[4:]}@proxy:3128", "path, query or fragment"),
        # a forgotten host puts the password where the port goes
        (f"http://user:{SECRET}", "port"),
        (f"http://user:{SECRET}@pro xy:3128", "whitespace"),
        (f"http://user:{SECRET}\n@proxy:3128", "whitespace or control"),
        (f"http://user:{SECRET}@pro_xy!:3128", "not a valid name"),
        (f"http://user:{SECRET}%ff@proxy:3128", "not percent-encoded UTF-8"),
        (f"http://us%3Aer:{SECRET}@proxy:3128", "must not contain ':'"),
    ],
)
def test_parseProxyURLRefusesWithoutLeaking(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parseProxyURL(text)
    message = str(info.value)
    assert problem in message
    assert "\n" not in message
    for piece in (SECRET, SECRET[:4], SECRET[4:]):
        assert piece not in message


def test_passwordNotInRepr() -> None:
    url = parseProxyURL(f"https://alice:{SECRET}@proxy.example:8443")
    assert SECRET not in repr(url)
    assert SECRET not in str(url)
    assert "alice" in repr(url)
    assert url.redacted() == "https://alice:***@proxy.example:8443"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (ProxyURL("http", "::1", 3128), "http://[::1]:3128"),
        (ProxyURL("http", "p", 80, "u"), "http://u@p:80"),
        (ProxyURL("http", "p", 80, "u", "x"), "http://u:***@p:80"),
    ],
)
def test_redacted(url: ProxyURL, shown: str) -> None:
    assert url.redacted() == shown


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (ProxyURL("http", "p", 80), None),
        (ProxyURL("http", "p", 80, "user", "pass"), b"Basic dXNlcjpwYXNz"),
        (ProxyURL("http", "p", 80, "user"), b"Basic " + base64.b64encode(b"user:")),
        (
            ProxyURL("http", "p", 80, "jürgen", "päss"),
            b"Basic " + base64.b64encode("jürgen:päss".encode()),
        ),
        (ProxyURL("http", "p", 80, "", "pw"), b"Basic " + base64.b64encode(b":pw")),
    ],
)
def test_authorization(url: ProxyURL, expected: bytes | None) -> None:
    assert url.authorization() == expected


# -- no_proxy ----------------------------------------------------------------------------------

# (entries, host, port, matches)
NO_PROXY = [
    ([], "example.com", 80, False),
    (["*"], "example.com", 80, True),
    (["*"], "10.0.0.1", 443, True),
    (["example.com"], "example.com", 80, True),
    (["example.com"], "www.example.com", 80, True),
    (["example.com"], "a.b.example.com", 80, True),
    (["example.com"], "badexample.com", 80, False),
    (["example.com"], "example.com.evil", 80, False),
    ([".example.com"], "example.com", 80, True),
    ([".example.com"], "www.example.com", 80, True),
    ([".example.com"], "badexample.com", 80, False),
    (["*.example.com"], "www.example.com", 80, True),
    (["EXAMPLE.com."], "Example.COM.", 80, True),
    (["example.com"], "EXAMPLE.COM", 443, True),
    (["example.com:8080"], "example.com", 8080, True),
    (["example.com:8080"], "example.com", 80, False),
    (["example.com:8080"], "www.example.com", 8080, True),
    (["localhost"], "localhost", 80, True),
    (["localhost"], "127.0.0.1", 80, False),  # no DNS: a name never matches an address
    (["10.0.0.1"], "10.0.0.1", 80, True),
    (["10.0.0.1"], "10.0.0.2", 80, False),
    (["10.0.0.1"], "::ffff:10.0.0.1", 80, True),
    (["10.0.0.1:80"], "10.0.0.1", 80, True),
    (["10.0.0.1:80"], "10.0.0.1", 81, False),
    (["10.0.0.0/8"], "10.20.30.40", 80, True),
    (["10.0.0.0/8"], "11.0.0.1", 80, False),
    (["10.0.0.0/8"], "ten.example", 80, False),
    (["192.168.1.1/16"], "192.168.200.1", 80, True),  # host bits tolerated, as curl does
    (["fd00::/8"], "fd12::1", 80, True),
    (["fd00::/8"], "[fd12::1]", 80, True),
    (["fd00::/8"], "fe80::1", 80, False),
    (["::1"], "::1", 80, True),
    (["::1"], "[::1]", 80, True),
    (["[::1]"], "::1", 80, True),
    (["[::1]:8080"], "[::1]", 8080, True),
    (["[::1]:8080"], "::1", 80, False),
    (["[fd00::/8]"], "fd00::5", 80, True),
    (["::1"], "127.0.0.1", 80, False),
    (["example.com, .internal  10.0.0.0/8"], "db.internal", 80, True),
    (["a.example", "b.example"], "b.example", 80, True),
    (["a.example", "b.example"], "c.example", 80, False),
]


@pytest.mark.parametrize(("entries", "host", "port", "expected"), NO_PROXY)
def test_noProxyMatches(entries: list[str], host: str, port: int, expected: bool) -> None:
    assert parseNoProxy(entries).matches(host, port) is expected


def test_emptyNoProxy() -> None:
    assert parseNoProxy([]) == NoProxy()
    assert parseNoProxy(["", " , "]) == NoProxy()
    assert parseNoProxy(["*"]).matchAll


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("example.com:80:90", "bad IP address"),
        ("example.com:", "bad port"),
        ("example.com:0", "bad port"),
        ("example.com:70000", "bad port"),
        ("[::1", "unclosed"),
        ("[::1]x", "junk after"),
        ("[::1]:http", "bad port"),
        ("[zz]", "bad IP address"),
        ("10.0.0.0/33", "bad network"),
        ("[10.0.0.0/8]:80", "cannot have a port"),
        ("fd00::zz", "bad IP address"),
        ("ex!ample.com", "not a host"),
        ("*.", "not a host"),
        (".", "not a host"),
        ("http://example.com", "a URL"),
    ],
)
def test_parseNoProxyRefuses(entry: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parseNoProxy([entry])
    message = str(info.value)
    assert message.startswith("invalid no_proxy entry ")
    assert problem in message
    assert "\n" not in message
