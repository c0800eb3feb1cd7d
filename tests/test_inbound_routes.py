"""The route table: match syntax, segment-boundary prefixes, longest match, hosts, stripping."""

from __future__ import annotations

import pytest
from attrs import frozen
from hypothesis import given
from hypothesis import strategies as st

from gateway.http1.parse import HTTPError
from gateway.inbound.routes import (
    Match,
    Redirect,
    Routed,
    RouteTable,
    hostKey,
    normalisePath,
    parseMatch,
)


@frozen
class Route:
    name: str
    match: Match
    strip_prefix: bool = True


def table(*specs: str | tuple[str, bool]) -> RouteTable:
    routes = []
    for spec in specs:
        text, strip = spec if isinstance(spec, tuple) else (spec, True)
        routes.append(Route(text, parseMatch(text), strip))
    return RouteTable(routes)


def routed(t: RouteTable, target: bytes, host: bytes = b"gw.example") -> Routed:
    result = t.match(host, target)
    assert isinstance(result, Routed), result
    return result


def name(t: RouteTable, target: bytes, host: bytes = b"gw.example") -> str | None:
    result = t.match(host, target)
    return result.route.name if isinstance(result, Routed) else None


# -- matching ----------------------------------------------------------------------------------


def test_prefixMatchesWholeSegments() -> None:
    t = table("/rstudio/")
    assert name(t, b"/rstudio/") == "/rstudio/"
    assert name(t, b"/rstudio/session/x?y=1") == "/rstudio/"
    assert name(t, b"/rstudiox") is None
    assert name(t, b"/rstudiox/") is None
    assert name(t, b"/") is None
    assert name(t, b"/other/rstudio/") is None


def test_longestPrefixWins() -> None:
    t = table("/", "/a/", "/a/b/", "/a/bc")
    assert name(t, b"/x") == "/"
    assert name(t, b"/a/x") == "/a/"
    assert name(t, b"/a/b/x") == "/a/b/"
    assert name(t, b"/a/bc/x") == "/a/bc"
    assert name(t, b"/a/bcd") == "/a/"


def test_routesNamingTheHostComeFirst() -> None:
    t = table("/rstudio/", "/", "apps.example.com", "apps.example.com/jupyter/")
    assert name(t, b"/rstudio/", b"apps.example.com") == "apps.example.com"
    assert name(t, b"/jupyter/x", b"apps.example.com") == "apps.example.com/jupyter/"
    assert name(t, b"/rstudio/", b"other.example.com") == "/rstudio/"
    assert name(t, b"/x", b"other.example.com") == "/"


def test_hostWithoutRootFallsBackToHostlessRoutes() -> None:
    t = table("apps.example.com/jupyter/", "/rstudio/")
    assert name(t, b"/rstudio/", b"apps.example.com") == "/rstudio/"
    assert name(t, b"/other", b"apps.example.com") is None


@pytest.mark.parametrize(
    "host",
    [b"apps.example.com", b"APPS.Example.com", b"apps.example.com:8443", b"apps.example.com.",
     b"apps.example.com.:80"],
)  # fmt: skip
def test_hostIgnoresPortCaseAndTrailingDot(host: bytes) -> None:
    assert name(table("apps.example.com"), b"/", host) == "apps.example.com"


def test_ipHosts() -> None:
    t = table("127.0.0.1/a/", "[::1]/b/")
    assert name(t, b"/a/", b"127.0.0.1:8080") == "127.0.0.1/a/"
    assert name(t, b"/b/", b"[::1]:8080") == "[::1]/b/"
    assert name(t, b"/b/", b"[::1]") == "[::1]/b/"
    assert hostKey(b"[::1]:80") == "::1"


def test_noMatchIsNone() -> None:
    t = table("/a/")
    assert t.match(b"h", b"/b") is None
    assert t.match(b"h", b"*") is None
    assert RouteTable([]).match(b"h", b"/") is None


def test_tableRefusesDuplicates() -> None:
    with pytest.raises(ValueError, match="two routes match /a"):
        table("/a/", "/a")


# -- the bare prefix ---------------------------------------------------------------------------


def test_bareSlashPrefixRedirects() -> None:
    t = table("/rstudio/")
    assert t.match(b"h", b"/rstudio") == Redirect(b"/rstudio/")
    assert t.match(b"h", b"/rstudio?a=1&b") == Redirect(b"/rstudio/?a=1&b")
    assert Redirect(b"/x/").status(b"GET") == 301
    assert Redirect(b"/x/").status(b"HEAD") == 301
    assert Redirect(b"/x/").status(b"POST") == 308


def test_barePrefixWithoutSlashIsForwarded() -> None:
    r = routed(table("/api"), b"/api?q=1")
    assert (r.target, r.stripped, r.prefix) == (b"/?q=1", b"/api", b"/api")
    r = routed(table(("/api", False)), b"/api")
    assert (r.target, r.stripped) == (b"/api", None)


def test_hostAloneNeverRedirects() -> None:
    r = routed(table("jupyter.example.com"), b"/", b"jupyter.example.com")
    assert (r.target, r.prefix, r.stripped) == (b"/", b"", None)


# -- what the backend gets ---------------------------------------------------------------------


def test_stripPrefix() -> None:
    r = routed(table("/rstudio/"), b"/rstudio/s/1/p?x=/rstudio/")
    assert r.target == b"/s/1/p?x=/rstudio/"
    assert r.stripped == b"/rstudio"
    assert r.prefix == b"/rstudio"
    assert r.publicTarget == b"/rstudio/s/1/p?x=/rstudio/"
    assert routed(table("/rstudio/"), b"/rstudio/").target == b"/"


def test_keepPrefix() -> None:
    r = routed(table(("/jupyter/", False)), b"/jupyter/hub/login?next=%2F")
    assert r.target == b"/jupyter/hub/login?next=%2F"
    assert r.stripped is None
    assert r.prefix == b"/jupyter"


def test_rootRouteStripsNothing() -> None:
    r = routed(table("/"), b"/a/b?c")
    assert (r.target, r.prefix, r.stripped, r.publicTarget) == (b"/a/b?c", b"", None, b"/a/b?c")


def test_hostAndPrefixStrip() -> None:
    r = routed(table("apps.example.com/rstudio/"), b"/rstudio/x", b"apps.example.com")
    assert (r.target, r.stripped) == (b"/x", b"/rstudio")


# -- normal form -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        (b"/a/b", b"/a/b"),
        (b"/%61dmin/", b"/admin/"),
        (b"/%7euser/%7E", b"/~user/~"),
        (b"/a%2fb", b"/a%2Fb"),
        (b"/a%20b", b"/a%20b"),
        (b"//admin//x", b"/admin/x"),
        (b"/a.b/.c/..d/", b"/a.b/.c/..d/"),
        (b"/caf%C3%A9", b"/caf%C3%A9"),
    ],
)
def test_normalisePath(path: bytes, normal: bytes) -> None:
    assert normalisePath(path) == normal


@pytest.mark.parametrize(
    "path", [b"/a/../admin", b"/a/./b", b"/..", b"/a/%2e%2e/b", b"/a/.%2E", b"/%2e/", b"/x/."]
)
def test_dotSegmentsRefused(path: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        normalisePath(path)
    assert info.value.status == 400
    assert "dot segments" in info.value.reason


@pytest.mark.parametrize("path", [b"/%", b"/%4", b"/%zz", b"/a%g0"])
def test_malformedEscapesRefused(path: bytes) -> None:
    with pytest.raises(HTTPError) as info:
        normalisePath(path)
    assert (info.value.status, info.value.reason) == (400, "malformed percent-encoding in the path")


def test_spellingCannotDodgeARoute() -> None:
    """The auth-protected route keeps its requests whatever the spelling of the path."""
    t = table("/admin/", "/")
    for target in (b"/%61dmin/x", b"//admin/x", b"/%61%64%6d%69%6e/x", b"///admin//x"):
        r = routed(t, target)
        assert r.route.name == "/admin/", target
        assert r.target == b"/x"
    with pytest.raises(HTTPError):
        t.match(b"h", b"/x/../admin/x")


def test_queryIsNotNormalised() -> None:
    assert routed(table("/"), b"/a?b=%61//..").target == b"/a?b=%61//.."


# -- properties --------------------------------------------------------------------------------

_segments = st.lists(st.sampled_from(["a", "b", "ab", "x", "rstudio", "%61", "~"]), max_size=5)


@given(st.lists(_segments, min_size=1, max_size=6, unique_by=tuple), _segments)
def test_longestSegmentPrefixWins(prefixes: list[list[str]], path: list[str]) -> None:
    """Against a brute-force reference: the route is the longest prefix made of whole
    segments of the (normalised) path."""
    specs = sorted({"/" + "/".join(p).replace("%61", "a") for p in prefixes})
    t = table(*specs)
    target = ("/" + "/".join(path)).encode()
    normal = normalisePath(target).decode()
    candidates = [s for s in specs if s == "/" or normal == s or normal.startswith(s + "/")]
    expected = max(candidates, key=len) if candidates else None
    assert name(t, target) == expected


@given(st.binary(max_size=40).map(lambda b: b"/" + b))
def test_normalFormIsStable(path: bytes) -> None:
    try:
        normal = normalisePath(path)
    except HTTPError as e:
        assert e.status == 400
        return
    assert normalisePath(normal) == normal
    assert b"//" not in normal


@given(_segments, st.booleans())
def test_stripThenPrefixGivesThePublicPath(path: list[str], strip: bool) -> None:
    t = table(("/app/", strip))
    target = ("/app/" + "/".join(path)).encode()
    r = routed(t, target)
    assert (r.stripped or b"") + r.target == normalisePath(target)
