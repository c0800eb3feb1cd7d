"""[reverse] and [route NAME]: defaults, the sample's commented route, every rule and error."""

from __future__ import annotations

import configparser
import ipaddress
import re
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ROUTE_SCHEMA, SCHEMA, Config, ConfigError, loadConfig, parseConfig
from gateway.inbound.balance import BackendURL
from gateway.inbound.rewrite import HeaderTemplate
from gateway.inbound.routes import Match

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "proxygate.ini"
FILE = "/etc/pg/test.ini"
ROUTE = "[route app]\nmatch = /app/\nbackends = http://127.0.0.1:8787\n"


def parse(text: str) -> Config:
    return parseConfig(text, FILE)


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(FILE + ": ")
    return message[len(FILE) + 2 :]


def test_reverseDefaults() -> None:
    c = parse("")
    assert c.reverse.listen == ()
    assert c.reverse.allowed_client_cidrs == (
        ipaddress.ip_network("0.0.0.0/0"),
        ipaddress.ip_network("::/0"),
    )
    assert c.reverse.http2 is False
    assert c.reverse.sticky_secret is None
    assert c.routes == ()


def test_routeDefaults() -> None:
    (route,) = parse(ROUTE).routes
    assert route.name == "app"
    assert route.match == Match(None, b"/app", True)
    assert route.backends == (BackendURL("http://127.0.0.1:8787", "http", "127.0.0.1", 8787),)
    assert route.strip_prefix is True
    assert route.balance == "round_robin"
    assert route.health_check is None
    assert route.health_interval == 5.0
    assert route.max_body_size == 0
    assert route.timeout == 300.0
    assert route.auth is False
    assert route.user_header == "X-Forwarded-User"
    assert route.request_headers == ()
    assert route.rewrite_location is True
    assert route.ca_bundle is None


def test_sampleDocumentsEveryRouteKeyWithItsDefault() -> None:
    """The sample's commented [route rstudio], uncommented, sets every key (its default but
    for match and backends) and parses."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    start = lines.index("# [route rstudio]")
    block = [line[2:] for line in lines[start:] if re.match(r"# [a-z_]+ =", line)]
    raw = configparser.ConfigParser(interpolation=None)
    raw.read_string("[route rstudio]\n" + "\n".join(block))
    assert list(raw["route rstudio"]) == list(ROUTE_SCHEMA)
    for key, (default, _) in ROUTE_SCHEMA.items():
        if key not in ("match", "backends"):
            assert raw["route rstudio"][key] == default, key
    text = "[route rstudio]\n" + "\n".join(block)
    assert parse(text).routes[0].backends[1].port == 8788
    assert list(SCHEMA["reverse"]) == ["listen", "allowed_client_cidrs", "http2", "sticky_secret"]


def test_sampleRequestHeadersExampleParses() -> None:
    text = ROUTE + "request_headers = X-RStudio-Root-Path: {prefix}\n    X-RSC-Request: {url}\n"
    (route,) = parse(text).routes
    assert route.request_headers == (
        HeaderTemplate(b"X-RStudio-Root-Path", ("prefix",)),
        HeaderTemplate(b"X-RSC-Request", ("url",)),
    )


# (key = value added to ROUTE, attribute, parsed value)
VALUES: list[tuple[str, str, Any]] = [
    ("match = /app", "match", Match(None, b"/app", False)),
    ("match = /", "match", Match(None, b"/", False)),
    ("match = /a/b/", "match", Match(None, b"/a/b", True)),
    ("match = /%61pp/", "match", Match(None, b"/app", True)),
    ("match = Apps.Example.COM/rstudio/", "match", Match("apps.example.com", b"/rstudio", True)),
    ("match = jupyter.example.com", "match", Match("jupyter.example.com", b"/", False)),
    ("match = jupyter.example.com.", "match", Match("jupyter.example.com", b"/", False)),
    ("match = jupyter.example.com/", "match", Match("jupyter.example.com", b"/", False)),
    ("match = 127.0.0.1/x", "match", Match("127.0.0.1", b"/x", False)),
    ("match = [::1]/x/", "match", Match("::1", b"/x", True)),
    ("backends = http://a:1, https://b\n  http://[::1]:9", "backends",
     (BackendURL("http://a:1", "http", "a", 1), BackendURL("https://b", "https", "b", 443),
      BackendURL("http://[::1]:9", "http", "::1", 9))),
    ("backends = http://rstudio:8787/", "backends",
     (BackendURL("http://rstudio:8787/", "http", "rstudio", 8787),)),
    ("strip_prefix = off", "strip_prefix", False),
    ("balance = sticky", "balance", "sticky"),
    ("balance = Least_Conn", "balance", "least_conn"),
    ("health_check = /healthz?full=1", "health_check", "/healthz?full=1"),
    ("health_interval = 0.5", "health_interval", 0.5),
    ("max_body_size = 1048576", "max_body_size", 1048576),
    ("max_body_size = 200M", "max_body_size", 200 << 20),
    ("max_body_size = 2g", "max_body_size", 2 << 30),
    ("max_body_size = 64KB", "max_body_size", 64 << 10),
    ("timeout = 3600", "timeout", 3600.0),
    ("user_header = X-RStudio-Username", "user_header", "X-RStudio-Username"),
    ("user_header =", "user_header", None),
    ("rewrite_location = no", "rewrite_location", False),
    ("ca_bundle = ca.pem", "ca_bundle", "/etc/pg/ca.pem"),
    ("request_headers = X-A: {scheme}://{host}{{x}}", "request_headers",
     (HeaderTemplate(b"X-A", ("scheme", b"://", "host", b"{x}")),)),
]  # fmt: skip


@pytest.mark.parametrize(("line", "attribute", "expected"), VALUES)
def test_routeValues(line: str, attribute: str, expected: Any) -> None:
    key = line.split("=")[0].strip()
    text = "\n".join(x for x in ROUTE.splitlines() if not x.startswith(key + " ")) + "\n" + line
    (route,) = parse(text + "\n").routes
    assert getattr(route, attribute) == expected


def test_authNeedsHtpasswd() -> None:
    assert refused(ROUTE + "auth = on\n") == (
        "[route app] auth: edge authentication needs [auth] htpasswd"
    )
    (route,) = parse(ROUTE + "auth = on\n[auth]\nhtpasswd = users\n").routes
    assert route.auth is True


def test_routesKeepFileOrder() -> None:
    text = ROUTE + "[route b]\nmatch = b.example\nbackends = http://b\n"
    assert [r.name for r in parse(text).routes] == ["app", "b"]


ERRORS: list[tuple[str, str]] = [
    ("[route]\n", "[route]: a route needs a name: [route NAME]"),
    ("[route a b]\n", "[route a b]: invalid route name 'a b': letters, digits"),
    ("[route -x]\n", "[route -x]: invalid route name '-x'"),
    ("[routes x]\n", "[routes x]: unknown section 'routes x' (did you mean [route NAME]?)"),
    ("[reverse]\nhttp3 = on\n", "[reverse] http3: unknown key 'http3' (did you mean 'http2'?)"),
    ("[reverse]\nmatch = /\n", "[reverse] match: unknown key 'match' (it belongs in [route NAME])"),
    ("[reverse]\nlisten = bogus\n", "[reverse] listen: invalid endpoint 'bogus'"),
    ("[reverse]\nallowed_client_cidrs = 10.0.0.1/8\n",
     "[reverse] allowed_client_cidrs: invalid CIDR '10.0.0.1/8': host bits set"),
    ("[reverse]\nhttp2 = maybe\n", "[reverse] http2: invalid boolean 'maybe'"),
    (ROUTE + "strip_prefx = on\n",
     "[route app] strip_prefx: unknown key 'strip_prefx' (did you mean 'strip_prefix'?)"),
    (ROUTE + "listen = tcp:1\n",
     "[route app] listen: unknown key 'listen' (it belongs in [proxy] or [metrics] or [reverse])"),
    (ROUTE + "[route app]\nmatch = /b\n", "[route app]: duplicate section (line 4)"),
    (ROUTE + "[route  app]\nmatch = /b/\nbackends = http://b\n",
     "[route  app]: route 'app' is defined twice"),
    ("[route a]\nbackends = http://b\n",
     "[route a] match: a match is required: a path prefix (/app/), host/prefix or a host"),
    ("[route a]\nmatch = /a\n", "[route a] backends: at least one backend URL is required"),
    # match
    ("[route a]\nmatch = ap!p/\n", "[route a] match: invalid host 'ap!p': letters, digits"),
    ("[route a]\nmatch = /a b\n", "[route a] match: invalid match '/a b': one prefix or host"),
    ("[route a]\nmatch = /a?x=1\n",
     "[route a] match: invalid match '/a?x=1': a prefix has no query"),
    ("[route a]\nmatch = /a/../b\n",
     "[route a] match: invalid match '/a/../b': dot segments ('.' or '..') in the path"),
    ("[route a]\nmatch = /%zz\n",
     "[route a] match: invalid match '/%zz': malformed percent-encoding in the path"),
    ("[route a]\nmatch = /a\"b\n",
     "[route a] match: invalid match '/a\"b': the prefix has characters a path cannot have"),
    ("[route a]\nmatch = *.example.com\n",
     "[route a] match: invalid host '*.example.com': wildcards are not supported"),
    ("[route a]\nmatch = example.com:8080/x\n",
     "[route a] match: invalid host 'example.com:8080': leave out the port"),
    ("[route a]\nmatch = exa..mple.com\n", "[route a] match: invalid host 'exa..mple.com'"),
    ("[route a]\nmatch = [::1/x\n",
     "[route a] match: invalid host '[::1': unterminated IPv6 literal"),
    ("[route a]\nmatch = [1.2.3.4]\n", "[route a] match: invalid host '[1.2.3.4]': not an IPv6"),
    # backends
    ("[route a]\nmatch = /a\nbackends = ftp://x\n",
     "[route a] backends: invalid backend URL 'ftp://x': use http://host[:port] or https://"),
    ("[route a]\nmatch = /a\nbackends = 127.0.0.1:8787\n",
     "[route a] backends: invalid backend URL '127.0.0.1:8787'"),
    ("[route a]\nmatch = /a\nbackends = http://127.0.0.1:8787/app\n",
     "[route a] backends: invalid backend URL 'http://127.0.0.1:8787/app': no path, query"),
    ("[route a]\nmatch = /a\nbackends = http://u:p@h\n",
     "[route a] backends: invalid backend URL 'http://u:p@h': no user information"),
    ("[route a]\nmatch = /a\nbackends = http://h:99999\n",
     "[route a] backends: invalid backend URL 'http://h:99999': Port out of range"),
    ("[route a]\nmatch = /a\nbackends = http://h:0\n",
     "[route a] backends: invalid backend URL 'http://h:0': port 0"),
    ("[route a]\nmatch = /a\nbackends = http://bad_host!\n",
     "[route a] backends: invalid backend URL 'http://bad_host!': invalid host"),
    ("[route a]\nmatch = /a\nbackends = http://h:1 http://H:1/\n",
     "[route a] backends: backend 'http://H:1/' is listed twice"),
    # the rest
    (ROUTE + "balance = random\n",
     "[route app] balance: unknown balance method 'random' "
     "(use round_robin | least_conn | sticky)"),
    (ROUTE + "health_check = healthz\n",
     "[route app] health_check: invalid health check path 'healthz'"),
    (ROUTE + "health_interval = 0\n",
     "[route app] health_interval: must be a number of seconds greater than 0"),
    (ROUTE + "max_body_size = -1\n", "[route app] max_body_size: invalid size '-1'"),
    (ROUTE + "max_body_size = 1.5M\n", "[route app] max_body_size: invalid size '1.5M'"),
    (ROUTE + "timeout = 0\n", "[route app] timeout: must be a number of seconds greater than 0"),
    (ROUTE + "user_header = X User\n", "[route app] user_header: invalid header name 'X User'"),
    (ROUTE + "user_header = Host\n",
     "[route app] user_header: header name 'Host': the gateway writes that header itself"),
    (ROUTE + "request_headers = X-A\n",
     "[route app] request_headers: line 'X-A': expected 'Name: value'"),
    (ROUTE + "request_headers = X-A: {path}\n",
     "[route app] request_headers: header 'X-A': unknown placeholder {path} "
     "(use {prefix} {scheme} {host} {url}, or {{ and }} for braces)"),
    (ROUTE + "request_headers = X-A: {prefix\n",
     "[route app] request_headers: unmatched '{' in '{prefix' (write {{ for a brace)"),
    (ROUTE + "request_headers = X-A: a}\n",
     "[route app] request_headers: unmatched '}' in 'a}' (write }} for a brace)"),
    (ROUTE + "request_headers = Transfer-Encoding: chunked\n",
     "[route app] request_headers: header name 'Transfer-Encoding': the gateway writes"),
    (ROUTE + "request_headers = Content_Length: 5\n",
     "[route app] request_headers: header name 'Content_Length': the gateway writes"),
    (ROUTE + "request_headers = X-A: 1\n  x-a: 2\n",
     "[route app] request_headers: header 'x-a' is set twice"),
    (ROUTE + "request_headers = X-A: caf\u00e9\n",
     "[route app] request_headers: header 'X-A': the value must be printable ASCII"),
    (ROUTE + "strip_prefix = maybe\n", "[route app] strip_prefix: invalid boolean 'maybe'"),
    (ROUTE + "request_headers = X-Forwarded-User: nobody\n",
     "[route app] request_headers: 'X-Forwarded-User' is the route's user_header"),
    # across routes
    (ROUTE + "[route b]\nmatch = /app\nbackends = http://b\n",
     "[route b] match: '/app' matches the same requests as [route app]"),
    (ROUTE + "[route b]\nmatch = /%61pp/\nbackends = http://b\n",
     "[route b] match: '/app/' matches the same requests as [route app]"),
    ("[route a]\nmatch = h.example\nbackends = http://b\n"
     "[route b]\nmatch = H.example./\nbackends = http://b\n",
     "[route b] match: 'h.example' matches the same requests as [route a]"),
    ("[proxy]\nlisten = tcp:3128:interface=127.0.0.1\n[reverse]\nlisten = tcp:3128\n",
     "[reverse] listen: 'tcp:3128' takes the port of [proxy] listen "
     "'tcp:3128:interface=127.0.0.1'"),
    ("[reverse]\nlisten = tcp:9530:interface=127.0.0.1\n",
     "[reverse] listen: 'tcp:9530:interface=127.0.0.1' takes the port of [metrics] listen"),
    ("[proxy]\nworkers = 2\n[reverse]\nlisten = unix:/tmp/gw.sock\n",
     "[reverse] listen: 2 worker processes need tcp:, tcp6: or ssl: listeners"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_errors(text: str, expected: str) -> None:
    assert refused(text).startswith(expected)


def test_portsOfOtherInterfacesMayBeShared() -> None:
    text = (
        "[proxy]\nlisten = tcp:3128:interface=127.0.0.1\n"
        "[reverse]\nlisten = tcp:3128:interface=127.0.0.2\n"
    )
    assert parse(text).reverse.listen == ("tcp:3128:interface=127.0.0.2",)


def test_unreadableCABundleNamesTheRoute(tmp_path: Path) -> None:
    ini = tmp_path / "gw.ini"
    ini.write_text(ROUTE + "ca_bundle = missing.pem\n")
    with pytest.raises(ConfigError) as info:
        loadConfig(str(ini))
    assert str(info.value) == (
        f"{ini}: [route app] ca_bundle: cannot read {tmp_path / 'missing.pem'}: "
        "No such file or directory"
    )


def test_setOverridesRouteKeys() -> None:
    c = parseConfig(ROUTE, FILE, overrides={("route app", "balance"): "sticky"})
    assert c.routes[0].balance == "sticky"


def test_stickySecretNotInRepr() -> None:
    c = parse("[reverse]\nsticky_secret = Pa55-key\n")
    assert c.reverse.sticky_secret == "Pa55-key"
    assert "Pa55-key" not in repr(c)
