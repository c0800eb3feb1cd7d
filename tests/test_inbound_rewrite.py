"""What a backend sees of a request and what a client sees of a response."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.inbound.balance import parseBackendURL
from gateway.inbound.rewrite import (
    IDENTITY_FIELDS,
    RequestRewriter,
    ResponseRewriter,
    forwardedPort,
    parseRequestHeaders,
)


def get(fields, name: bytes) -> list[bytes]:
    return [v for n, v in fields if n.lower() == name.lower()]


def rewrite(fields, rewriter: RequestRewriter | None = None, **kwargs):
    rewriter = rewriter or RequestRewriter(b"X-Forwarded-User")
    args = {"client": "192.0.2.7", "scheme": "https", "authority": b"apps.example.com:8443"}
    args.update(kwargs)
    return rewriter.fields(fields, **args)


# -- forwarding fields -------------------------------------------------------------------------


def test_forwardingFieldsAreTheGateways() -> None:
    sent = [
        (b"Accept", b"*/*"),
        (b"X-Forwarded-For", b"10.0.0.1"),
        (b"x-forwarded-proto", b"http"),
        (b"X-Forwarded-Host", b"evil.example"),
        (b"X-Forwarded-Port", b"1"),
        (b"X-Forwarded-Prefix", b"/admin"),
        (b"Forwarded", b"for=10.0.0.1"),
        (b"X-Real-IP", b"10.0.0.1"),
        (b"X-Scheme", b"http"),
        (b"X_Forwarded_For", b"10.0.0.2"),
        (b"Cookie", b"a=b"),
    ]
    out = rewrite(sent, stripped=b"/rstudio")
    assert out == [
        (b"Accept", b"*/*"),
        (b"Cookie", b"a=b"),
        (b"X-Forwarded-For", b"192.0.2.7"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"apps.example.com:8443"),
        (b"X-Forwarded-Port", b"8443"),
        (b"X-Forwarded-Prefix", b"/rstudio"),
    ]


def test_noPrefixHeaderWhenNothingStripped() -> None:
    assert get(rewrite([]), b"X-Forwarded-Prefix") == []


@pytest.mark.parametrize(
    ("authority", "scheme", "port"),
    [
        (b"h", "http", b"80"),
        (b"h", "https", b"443"),
        (b"h:8080", "http", b"8080"),
        (b"[::1]", "https", b"443"),
        (b"[::1]:9", "http", b"9"),
        (b"h:", "http", b"80"),
    ],
)
def test_forwardedPort(authority: bytes, scheme: str, port: bytes) -> None:
    assert forwardedPort(authority, scheme) == port


# -- identity ----------------------------------------------------------------------------------


def test_identityHeadersFromClientsAreDropped() -> None:
    sent = [(name, b"admin") for name in sorted(IDENTITY_FIELDS)]
    sent += [
        (b"Remote_User", b"admin"),
        (b"X-RStudio-Username", b"admin"),
        (b"x-auth-username", b"admin"),
        (b"X-My-User", b"admin"),
        (b"Accept", b"*/*"),
    ]
    out = rewrite(sent, RequestRewriter(b"X-My-User"))
    assert [v for _, v in out].count(b"admin") == 0
    assert out[0] == (b"Accept", b"*/*")


def test_authenticatedUserGoesInUserHeader() -> None:
    rewriter = RequestRewriter(b"X-RStudio-Username", edgeAuth=True)
    sent = [
        (b"X-RStudio-Username", b"root"),
        (b"Authorization", b"Basic YWxpY2U6c2VjcmV0"),
        (b"Remote-User", b"root"),
    ]
    out = rewrite(sent, rewriter, user="alice")
    assert get(out, b"X-RStudio-Username") == [b"alice"]
    assert get(out, b"Authorization") == []
    assert get(out, b"Remote-User") == []


def test_withoutEdgeAuthAuthorizationPasses() -> None:
    out = rewrite([(b"Authorization", b"token abc")])
    assert get(out, b"Authorization") == [b"token abc"]
    assert get(out, b"X-Forwarded-User") == []


def test_userNamesAreUTF8AndNeverControlCharacters() -> None:
    assert get(rewrite([], user="j\u00fcrgen"), b"X-Forwarded-User") == ["j\u00fcrgen".encode()]
    assert get(rewrite([], user="a\r\nX-Evil: 1"), b"X-Forwarded-User") == []


def test_noUserHeader() -> None:
    out = rewrite([(b"X-Forwarded-User", b"x")], RequestRewriter(None, edgeAuth=True), user="a")
    assert get(out, b"X-Forwarded-User") == []


# -- request_headers ---------------------------------------------------------------------------


def test_requestHeadersPlaceholders() -> None:
    templates = parseRequestHeaders(
        "X-RStudio-Root-Path: {prefix}\nX-RSC-Request: {url}\nX-Where: {scheme} {host} {{literal}}"
    )
    rewriter = RequestRewriter(b"X-Forwarded-User", templates)
    sent = [(b"X-RStudio-Root-Path", b"/evil"), (b"x-where", b"client")]
    out = rewrite(sent, rewriter, prefix=b"/rstudio", publicTarget=b"/rstudio/p/1?a=b")
    assert get(out, b"X-RStudio-Root-Path") == [b"/rstudio"]
    assert get(out, b"X-RSC-Request") == [b"https://apps.example.com:8443/rstudio/p/1?a=b"]
    assert get(out, b"X-Where") == [b"https apps.example.com:8443 {literal}"]


def test_requestHeadersOverrideTheGatewaysOwn() -> None:
    """TLS ended in front of the gateway: the INI says what the scheme is."""
    rewriter = RequestRewriter(None, parseRequestHeaders("X-Forwarded-Proto: https"))
    out = rewrite([], rewriter, scheme="http", authority=b"h")
    assert get(out, b"X-Forwarded-Proto") == [b"https"]


_piece = st.one_of(
    st.sampled_from(["{prefix}", "{scheme}", "{host}", "{url}", "{{", "}}", "{", "}", "{x}"]),
    st.text(alphabet="ab -/", min_size=1, max_size=3),
)
_VALUES = {"prefix": "/P", "scheme": "S", "host": "H:1", "url": "U?"}


@given(st.lists(_piece, min_size=1, max_size=8))
def test_templatesRenderAsStrFormatDoes(pieces: list[str]) -> None:
    """The placeholder grammar is str.format's, restricted to four names."""
    value = "".join(pieces).strip()
    try:
        expected = value.format(**_VALUES)
    except (ValueError, KeyError, IndexError):
        expected = None
    try:
        templates = parseRequestHeaders(f"X-T: {value}")
    except ValueError:
        assert expected is None or not value
        return
    rendered = (
        templates[0].render({k: v.encode() for k, v in _VALUES.items()}) if templates else b""
    )
    assert rendered.decode() == expected


# -- responses ---------------------------------------------------------------------------------

BACKENDS = [parseBackendURL("http://127.0.0.1:8787"), parseBackendURL("http://rstudio-2:80")]


def respond(fields, prefix: bytes = b"/rstudio", rewriter=None, **kwargs):
    rewriter = rewriter or ResponseRewriter(BACKENDS)
    args = {"scheme": "https", "authority": b"apps.example.com", "prefix": prefix}
    args.update(kwargs)
    return rewriter.fields(fields, **args)


@pytest.mark.parametrize(
    ("location", "public"),
    [
        (b"http://127.0.0.1:8787/auth-sign-in?appUri=%2F",
         b"https://apps.example.com/rstudio/auth-sign-in?appUri=%2F"),
        (b"http://127.0.0.1:8787", b"https://apps.example.com/rstudio/"),
        (b"http://127.0.0.1:8787?x", b"https://apps.example.com/rstudio/?x"),
        (b"HTTP://LOCALHOST:8787/x", b"https://apps.example.com/rstudio/x"),
        (b"http://rstudio-2/x", b"https://apps.example.com/rstudio/x"),
        (b"http://rstudio-2:80/x", b"https://apps.example.com/rstudio/x"),
        (b"http://127.0.0.1:8788/x", b"http://127.0.0.1:8788/x"),
        (b"https://127.0.0.1:8787/x", b"https://127.0.0.1:8787/x"),
        (b"http://example.com/x", b"http://example.com/x"),
        (b"/relative", b"/relative"),
        (b"other/relative", b"other/relative"),
        (b"http://127.0.0.1:87870/x", b"http://127.0.0.1:87870/x"),
    ],
)  # fmt: skip
def test_locationRewriting(location: bytes, public: bytes) -> None:
    out = respond([(b"Location", location)])
    assert out == [(b"Location", public)]
    assert respond([(b"content-location", location)]) == [(b"content-location", public)]


def test_locationWithoutStrippedPrefix() -> None:
    out = respond([(b"Location", b"http://127.0.0.1:8787/jupyter/hub/")], prefix=b"")
    assert out == [(b"Location", b"https://apps.example.com/jupyter/hub/")]


@pytest.mark.parametrize(
    ("refresh", "public"),
    [
        (b"5; url=http://127.0.0.1:8787/x", b"5; url=https://apps.example.com/rstudio/x"),
        (b"0;URL='http://127.0.0.1:8787/x'", b"0;URL='https://apps.example.com/rstudio/x'"),
        (b'3, url="http://127.0.0.1:8787/"', b'3, url="https://apps.example.com/rstudio/"'),
        (b"5;http://127.0.0.1:8787/y", b"5;https://apps.example.com/rstudio/y"),
        (b"5", b"5"),
        (b"5; url=/local", b"5; url=/local"),
        (b"5; url=http://elsewhere/", b"5; url=http://elsewhere/"),
    ],
)
def test_refreshRewriting(refresh: bytes, public: bytes) -> None:
    assert respond([(b"Refresh", refresh)]) == [(b"Refresh", public)]


def test_untouchedResponsesAreTheSameList() -> None:
    fields = [(b"Content-Type", b"text/html"), (b"Location", b"/x"), (b"Set-Cookie", b"a=b")]
    assert respond(fields) is fields
    off = ResponseRewriter(BACKENDS, rewrite=False)
    moved = [(b"Location", b"http://127.0.0.1:8787/x")]
    assert respond(moved, rewriter=off) is moved


def test_stickyCookieIsAdded() -> None:
    fields = [(b"Set-Cookie", b"app=1")]
    out = respond(fields, setCookie=b"proxygate_r=abc; Path=/rstudio")
    assert out == [(b"Set-Cookie", b"app=1"), (b"Set-Cookie", b"proxygate_r=abc; Path=/rstudio")]
    assert fields == [(b"Set-Cookie", b"app=1")]


def test_whatClientsSendIsRememberedWithinBounds() -> None:
    rewriter = RequestRewriter(b"X-Forwarded-User")
    long = b"X-" + b"a" * 300
    for _ in range(2):
        out = rewriter.fields(
            [(long, b"1"), (b"Remote-User", b"root")],
            client="192.0.2.1",
            scheme="http",
            authority=b"h" * 300,
        )
        assert (long, b"1") in out and (b"Remote-User", b"root") not in out
    assert long not in rewriter._verdicts and rewriter._forwarding == {}
    rewriter.fields([], client="192.0.2.1", scheme="http", authority=b"gw")
    assert len(rewriter._forwarding) == 1
