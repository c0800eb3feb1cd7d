"""INI -> Config: defaults, the sample file, every value rule and every error shape."""

from __future__ import annotations

import configparser
import ipaddress
import os
from pathlib import Path
from typing import Any

import attrs
import pytest

from gateway import config as configModule
from gateway.config import (
    SCHEMA,
    Config,
    ConfigError,
    defaultConfig,
    endpointAddress,
    loadConfig,
    parseConfig,
)
from gateway.policy import parseHostPatterns, parseTunnelPatterns
from gateway.upstream import ProxyURL, parseNoProxy

SAMPLE = Path(__file__).resolve().parent.parent / "etc" / "proxygate.ini"
FILE = "/etc/pg/test.ini"  # never read: parseConfig only uses it for messages and paths


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def parse(text: str, **kwargs: Any) -> Config:
    return parseConfig(text, FILE, **kwargs)


def refused(text: str, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(FILE + ": ")
    return message


# -- defaults ----------------------------------------------------------------------------------


def test_defaultsAreDesignMd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    c = defaultConfig()
    assert c.proxy == configModule.ProxyConfig(
        listen=("tcp:3128:interface=127.0.0.1",),
        allowed_client_cidrs=(net("127.0.0.0/8"), net("::1/128")),
        connect_ports=((443, 443),),
        allow_destinations=(),
        deny_destinations=parseHostPatterns(
            ["127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/8"]
        ),
        via="proxygate",
        forwarded_for=False,
        connect_timeout=10.0,
        header_timeout=30.0,
        idle_timeout=300.0,
        max_header_size=65536,
        max_connections=10000,
    )
    assert c.auth == configModule.AuthConfig(htpasswd=None, realm="proxygate")
    assert c.upstream == configModule.UpstreamConfig(
        proxy=None, no_proxy=parseNoProxy([]), ca_certificate=None, verify=True
    )
    assert c.mitm == configModule.MitmConfig(
        enabled=False,
        ca_cert=str(tmp_path / "proxygate-ca.pem"),
        ca_key=str(tmp_path / "proxygate-ca.key"),
        intercept=parseTunnelPatterns(["*"]),
        passthrough=(),
        upstream_ca_bundle=None,
        verify_upstream=True,
        http2=True,
        http2_max_streams=100,
    )
    assert c.metrics == configModule.MetricsConfig(
        listen=("tcp:9530:interface=127.0.0.1",), path="/metrics"
    )
    assert c.log == configModule.LogConfig(access_log="-", format="squid")
    assert c.path is None
    assert loadConfig(None) == c
    assert parseConfig("") == c


def test_configIsFrozen() -> None:
    c = defaultConfig()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        c.proxy.via = "x"  # type: ignore[misc]


def test_emptySectionsGiveDefaults() -> None:
    text = "".join(f"[{section}]\n" for section in SCHEMA)
    assert parse(text) == attrs.evolve(parseConfig("", "/etc/pg/other.ini"), path=FILE)


# -- the sample file ---------------------------------------------------------------------------


def test_sampleIsDefaults() -> None:
    sample = loadConfig(str(SAMPLE))
    defaults = defaultConfig()
    etc = SAMPLE.parent
    assert sample.path == str(SAMPLE)
    assert sample.mitm.ca_cert == str(etc / "proxygate-ca.pem")
    assert sample.mitm.ca_key == str(etc / "proxygate-ca.key")
    expected = attrs.evolve(
        defaults,
        mitm=attrs.evolve(defaults.mitm, ca_cert=sample.mitm.ca_cert, ca_key=sample.mitm.ca_key),
        path=sample.path,
    )
    assert sample == expected


def test_sampleSetsEveryKeyToItsDefault() -> None:
    raw = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    raw.read(SAMPLE, encoding="utf-8")
    assert raw.sections() == list(SCHEMA)
    for section, keys in SCHEMA.items():
        assert list(raw[section]) == list(keys), section
        for key, (default, _) in keys.items():
            assert raw[section][key] == default, (section, key)


def test_sampleCommentsEveryKey() -> None:
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if "=" in line and not line.startswith(("#", ";", " ")):
            key = line.split("=")[0].strip()
            above = [lines[index - 1], lines[index - 2]]
            # each key has a comment right above it (ca_cert/ca_key share one)
            assert any(a.startswith("#") for a in above) or key == "ca_key", key


# -- values ------------------------------------------------------------------------------------

# (section, key, value written, attribute path, parsed value)
VALUES: list[tuple[str, str, str, str, Any]] = [
    ("proxy", "listen", "tcp:3128:interface=127.0.0.1 tcp:3129", "proxy.listen",
     ("tcp:3128:interface=127.0.0.1", "tcp:3129")),
    ("proxy", "listen", "tcp:0:interface=127.0.0.1,tcp6:0:interface=\\:\\:1", "proxy.listen",
     ("tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1")),
    ("proxy", "listen", "\n  tcp:1:interface=127.0.0.1\n  unix:/tmp/pg.sock", "proxy.listen",
     ("tcp:1:interface=127.0.0.1", "unix:/tmp/pg.sock")),
    ("proxy", "allowed_client_cidrs", "10.0.0.0/8, 192.168.0.0/16\n  fd00::/8",
     "proxy.allowed_client_cidrs",
     (net("10.0.0.0/8"), net("192.168.0.0/16"), net("fd00::/8"))),
    ("proxy", "allowed_client_cidrs", "10.1.2.3 [::1] ::ffff:10.0.0.0/104",
     "proxy.allowed_client_cidrs",
     (net("10.1.2.3/32"), net("::1/128"), net("10.0.0.0/8"))),
    ("proxy", "allowed_client_cidrs", "", "proxy.allowed_client_cidrs", ()),
    ("proxy", "connect_ports", "443 8443 1024-65535", "proxy.connect_ports",
     ((443, 443), (8443, 8443), (1024, 65535))),
    ("proxy", "connect_ports", "443,563", "proxy.connect_ports", ((443, 443), (563, 563))),
    ("proxy", "connect_ports", "", "proxy.connect_ports", ()),
    ("proxy", "allow_destinations", "example.com .example.org *.example.net 10.0.0.0/8 [::1]",
     "proxy.allow_destinations",
     parseHostPatterns(["example.com", ".example.org", "*.example.net", "10.0.0.0/8", "::1"])),
    ("proxy", "deny_destinations", "", "proxy.deny_destinations", ()),
    ("proxy", "via", "", "proxy.via", ""),
    ("proxy", "via", "gw-1.example", "proxy.via", "gw-1.example"),
    ("proxy", "connect_timeout", "0.5", "proxy.connect_timeout", 0.5),
    ("proxy", "header_timeout", "1e1", "proxy.header_timeout", 10.0),
    ("proxy", "idle_timeout", "3600", "proxy.idle_timeout", 3600.0),
    ("proxy", "max_header_size", "8192", "proxy.max_header_size", 8192),
    ("proxy", "max_connections", "1", "proxy.max_connections", 1),
    ("auth", "htpasswd", "users.htpasswd", "auth.htpasswd", "/etc/pg/users.htpasswd"),
    ("auth", "htpasswd", "../shared/users", "auth.htpasswd", "/etc/shared/users"),
    ("auth", "htpasswd", "/srv/users", "auth.htpasswd", "/srv/users"),
    ("auth", "realm", "Corporate proxy", "auth.realm", "Corporate proxy"),
    ("upstream", "proxy", "http://u:p%40ss@up.example:8080", "upstream.proxy",
     ProxyURL("http", "up.example", 8080, "u", "p@ss")),
    ("upstream", "proxy", "https://up.example", "upstream.proxy",
     ProxyURL("https", "up.example", 443)),
    ("upstream", "no_proxy", "localhost, .internal 10.0.0.0/8", "upstream.no_proxy",
     parseNoProxy(["localhost", ".internal", "10.0.0.0/8"])),
    ("upstream", "ca_certificate", "ca.pem", "upstream.ca_certificate", "/etc/pg/ca.pem"),
    ("upstream", "verify", "off", "upstream.verify", False),
    ("mitm", "enabled", "on", "mitm.enabled", True),
    ("mitm", "ca_cert", "/var/lib/pg/ca.pem", "mitm.ca_cert", "/var/lib/pg/ca.pem"),
    ("mitm", "ca_key", "keys/ca.key", "mitm.ca_key", "/etc/pg/keys/ca.key"),
    ("mitm", "intercept", ".example.com", "mitm.intercept", parseTunnelPatterns([".example.com"])),
    ("mitm", "intercept", "", "mitm.intercept", ()),
    ("mitm", "passthrough", "*.bank.example pinned.example", "mitm.passthrough",
     parseTunnelPatterns(["*.bank.example", "pinned.example"])),
    ("mitm", "passthrough", "*:21 *:25 ftp.example:2121 [::1]:22", "mitm.passthrough",
     parseTunnelPatterns(["*:21", "*:25", "ftp.example:2121", "[::1]:22"])),
    ("mitm", "upstream_ca_bundle", "bundle.pem", "mitm.upstream_ca_bundle", "/etc/pg/bundle.pem"),
    ("mitm", "verify_upstream", "no", "mitm.verify_upstream", False),
    ("mitm", "http2", "off", "mitm.http2", False),
    ("mitm", "http2_max_streams", "1000", "mitm.http2_max_streams", 1000),
    ("metrics", "listen", "", "metrics.listen", ()),
    ("metrics", "listen", "tcp6:9100:interface=\\:\\:1", "metrics.listen",
     ("tcp6:9100:interface=\\:\\:1",)),
    ("metrics", "path", "/internal/metrics", "metrics.path", "/internal/metrics"),
    ("log", "access_log", "", "log.access_log", None),
    ("log", "access_log", "-", "log.access_log", "-"),
    ("log", "access_log", "access.log", "log.access_log", "/etc/pg/access.log"),
    ("log", "format", "JSON", "log.format", "json"),
    ("log", "format", "combined", "log.format", "combined"),
]  # fmt: skip


def attribute(config: Config, dotted: str) -> Any:
    value: Any = config
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


@pytest.mark.parametrize(("section", "key", "value", "where", "expected"), VALUES)
def test_values(section: str, key: str, value: str, where: str, expected: Any) -> None:
    parsed = attribute(parse(f"[{section}]\n{key} = {value}\n"), where)
    assert parsed == expected


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [
        ("on", True), ("ON", True), ("true", True), ("True", True), ("yes", True), ("1", True),
        ("off", False), ("Off", False), ("false", False), ("no", False), ("NO", False),
        ("0", False),
    ],
)  # fmt: skip
def test_booleans(spelling: str, expected: bool) -> None:
    assert parse(f"[proxy]\nforwarded_for = {spelling}\n").proxy.forwarded_for is expected


def test_commentsAndContinuationLines() -> None:
    c = parse(
        "# full-line comment\n"
        "[proxy]\n"
        "; another\n"
        "deny_destinations = 10.0.0.0/8   ; inline comment\n"
        "    # a comment line inside the list\n"
        "    192.168.0.0/16, fd00::/8 # and another\n"
        "via = a#b\n"
    )
    assert c.proxy.deny_destinations == parseHostPatterns(
        ["10.0.0.0/8", "192.168.0.0/16", "fd00::/8"]
    )
    assert c.proxy.via == "a#b"  # '#' starts a comment only after whitespace


def test_keysAreCaseInsensitiveSectionsAreNot() -> None:
    assert parse("[proxy]\nVia = other\n").proxy.via == "other"
    message = refused("[Proxy]\nvia = other\n")
    assert message == f"{FILE}: [Proxy]: unknown section 'Proxy' (did you mean 'proxy'?)"


def test_mitmDisabledStillValidated() -> None:
    message = refused("[mitm]\nenabled = off\nintercept = a..b\n")
    assert message.startswith(f"{FILE}: [mitm] intercept: invalid host pattern 'a..b'")
    message = refused("[mitm]\npassthrough = *:99999\n")
    assert message.startswith(f"{FILE}: [mitm] passthrough: invalid host pattern '*:99999'")
    assert "self" in refused("[mitm]\npassthrough = self:22\n")


# -- errors: every shape -----------------------------------------------------------------------

# (INI text, the exact line, or the start of it)
ERRORS: list[tuple[str, str]] = [
    # structure
    ("[proxyy]\n", "[proxyy]: unknown section 'proxyy' (did you mean 'proxy'?)"),
    ("[zzz]\n",
     "[zzz]: unknown section 'zzz' (sections: proxy, auth, upstream, mitm, metrics, log, "
     "reverse, route NAME)"),
    ("[DEFAULT]\nvia = x\n", "[DEFAULT]: unknown section 'DEFAULT'"),
    ("[proxy]\nconect_timeout = 3\n",
     "[proxy] conect_timeout: unknown key 'conect_timeout' (did you mean 'connect_timeout'?)"),
    ("[proxy]\nqqq = 3\n", "[proxy] qqq: unknown key 'qqq'"),
    ("[proxy]\nhtpasswd = x\n", "[proxy] htpasswd: unknown key 'htpasswd' (it belongs in [auth])"),
    ("[auth]\nlisten = tcp:1\n",
     "[auth] listen: unknown key 'listen' (it belongs in [proxy] or [metrics] or [reverse])"),
    ("[proxy]\nvia = a\n[proxy]\nvia = b\n", "[proxy]: duplicate section (line 3)"),
    ("[proxy]\nvia = a\nvia = b\n", "[proxy] via: duplicate key (line 3)"),
    ("via = a\n", "line 1: a key before any [section] header"),
    ("[proxy]\nvia a\n", "line 2: expected 'key = value'"),
    ("[proxy]\nvia a\nfoo\nbar\n", "line 2: expected 'key = value' (and 2 more)"),
    ("[proxy]\nvia: a\n", "line 2: expected 'key = value'"),
    # booleans
    ("[proxy]\nforwarded_for = maybe\n",
     "[proxy] forwarded_for: invalid boolean 'maybe' (use on/off, true/false, yes/no or 1/0)"),
    ("[upstream]\nverify = \n", "[upstream] verify: invalid boolean ''"),
    ("[mitm]\nenabled = enabled\n", "[mitm] enabled: invalid boolean 'enabled'"),
    ("[mitm]\nverify_upstream = 2\n", "[mitm] verify_upstream: invalid boolean '2'"),
    ("[mitm]\nhttp2 = h2\n", "[mitm] http2: invalid boolean 'h2'"),
    ("[mitm]\nhttp2_max_streams = 0\n", "[mitm] http2_max_streams: must be greater than 0"),
    ("[mitm]\nhttp2_max_streams = 1001\n",
     "[mitm] http2_max_streams: 1001 streams per connection is more than 1000"),
    # timeouts
    ("[proxy]\nconnect_timeout = 0\n",
     "[proxy] connect_timeout: must be a number of seconds greater than 0, not '0'"),
    ("[proxy]\nheader_timeout = -1\n", "[proxy] header_timeout: must be a number of seconds"),
    ("[proxy]\nidle_timeout = inf\n", "[proxy] idle_timeout: must be a number of seconds"),
    ("[proxy]\nidle_timeout = nan\n", "[proxy] idle_timeout: must be a number of seconds"),
    ("[proxy]\nconnect_timeout = 10s\n",
     "[proxy] connect_timeout: invalid number of seconds '10s'"),
    ("[proxy]\nconnect_timeout =\n", "[proxy] connect_timeout: invalid number of seconds ''"),
    # integers
    ("[proxy]\nmax_header_size = 64k\n", "[proxy] max_header_size: invalid integer '64k'"),
    ("[proxy]\nmax_header_size = 0\n", "[proxy] max_header_size: must be greater than 0, not '0'"),
    ("[proxy]\nmax_connections = -5\n", "[proxy] max_connections: invalid integer '-5'"),
    ("[proxy]\nmax_connections = 1.5\n", "[proxy] max_connections: invalid integer '1.5'"),
    # CIDRs
    ("[proxy]\nallowed_client_cidrs = 10.0.0.1/8\n",
     "[proxy] allowed_client_cidrs: invalid CIDR '10.0.0.1/8': host bits set "
     "(did you mean 10.0.0.0/8?)"),
    ("[proxy]\nallowed_client_cidrs = 10.0.0.0/33\n",
     "[proxy] allowed_client_cidrs: invalid CIDR '10.0.0.0/33'"),
    ("[proxy]\nallowed_client_cidrs = localhost\n",
     "[proxy] allowed_client_cidrs: invalid CIDR 'localhost'"),
    # ports
    ("[proxy]\nconnect_ports = 0\n",
     "[proxy] connect_ports: invalid port range '0': 0 is not in 1-65535"),
    ("[proxy]\nconnect_ports = 443 70000\n",
     "[proxy] connect_ports: invalid port range '70000': 70000 is not in 1-65535"),
    ("[proxy]\nconnect_ports = 2000-1000\n",
     "[proxy] connect_ports: invalid port range '2000-1000': reversed (2000 > 1000)"),
    ("[proxy]\nconnect_ports = https\n",
     "[proxy] connect_ports: invalid port range 'https': 'https' is not a port number"),
    # host patterns
    ("[proxy]\nallow_destinations = a..b\n",
     "[proxy] allow_destinations: invalid host pattern 'a..b': empty label"),
    ("[proxy]\ndeny_destinations = 10.0.0.0/8 example.com:25\n",
     "[proxy] deny_destinations: invalid host pattern 'example.com:25'"),
    ("[mitm]\npassthrough = foo.*.com\n", "[mitm] passthrough: invalid host pattern 'foo.*.com'"),
    # strings
    ("[proxy]\nvia = two words\n", "[proxy] via: invalid pseudonym 'two words'"),
    ("[proxy]\nvia = a\"b\n", "[proxy] via: invalid pseudonym"),
    ("[auth]\nrealm =\n", "[auth] realm: invalid realm ''"),
    ("[auth]\nrealm = a\"b\n", "[auth] realm: invalid realm"),
    ("[auth]\nrealm = caf\u00e9\n", "[auth] realm: invalid realm"),
    ("[metrics]\npath = metrics\n", "[metrics] path: invalid path 'metrics'"),
    ("[metrics]\npath = /m?x=1\n", "[metrics] path: invalid path"),
    ("[metrics]\npath =\n", "[metrics] path: invalid path ''"),
    ("[log]\nformat = apache\n",
     "[log] format: unknown log format 'apache' (use squid, combined, json)"),
    ("[mitm]\nca_cert =\n", "[mitm] ca_cert: a file path is required"),
    ("[mitm]\nca_key =\n", "[mitm] ca_key: a file path is required"),
    # endpoints
    ("[proxy]\nlisten =\n", "[proxy] listen: at least one endpoint is required"),
    ("[proxy]\nlisten = foo:1\n",
     "[proxy] listen: invalid endpoint 'foo:1': Unknown endpoint type: 'foo'"),
    ("[proxy]\nlisten = tcp:abc\n", "[proxy] listen: invalid endpoint 'tcp:abc'"),
    ("[proxy]\nlisten = tcp:3128:interface=::1\n",
     "[proxy] listen: invalid endpoint 'tcp:3128:interface=::1': _parseTCP() got multiple "
     "values for argument 'interface' (escape ':' in IPv6 addresses: interface=\\:\\:1)"),
    ("[proxy]\nlisten = tcp:3128:bogus=1\n", "[proxy] listen: invalid endpoint 'tcp:3128:bogus=1'"),
    ("[proxy]\nlisten = tcp:70000:interface=127.0.0.1\n",
     "[proxy] listen: invalid endpoint 'tcp:70000:interface=127.0.0.1': "
     "port '70000' is not in 0-65535"),
    ("[proxy]\nlisten = ssl:3129:privateKey=/nonexistent/k.pem:interface=127.0.0.1\n",
     "[proxy] listen: invalid endpoint 'ssl:3129:privateKey=/nonexistent/k.pem"),
    ("[metrics]\nlisten = tcp:9530:interface=127.0.0.1 bogus\n",
     "[metrics] listen: invalid endpoint 'bogus'"),
    # upstream
    ("[upstream]\nproxy = socks5://h:1080\n",
     "[upstream] proxy: unsupported upstream proxy scheme 'socks5': use http:// or https://"),
    ("[upstream]\nproxy = proxy.example:3128\n", "[upstream] proxy: invalid upstream proxy URL"),
    ("[upstream]\nno_proxy = [::1\n", "[upstream] no_proxy: invalid no_proxy entry '[::1'"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_errors(text: str, expected: str) -> None:
    message = refused(text)
    assert message.startswith(f"{FILE}: {expected}")


@pytest.mark.parametrize(
    "text",
    [
        "[upstream]\nproxy = http://alice:Pa55word@proxy.example:99999\n",
        "[upstream]\nproxy = http://alice:Pa55word@\n",
        "[upstream]\nproxy = http://alice:Pa55word\n",
        "[upstream]\nproxy = http://alice:Pa5/5word@proxy.example:3128\n",
        "[upstream]\nproxy = ftp://alice:Pa55word@proxy.example\n",
        "[upstream]\nproxy http://alice:Pa55word@proxy.example\n",  # forgot '='
        "[upstream]\nproxy = http://alice:Pa55word@proxy.example:3128\nproxy = x\n",
        "[upstream]\nproxy = http://alice:Pa55word@proxy.example:3128\nfoo = 1\n",
    ],
)
def test_passwordNeverInErrors(text: str) -> None:
    message = refused(text)
    for piece in ("Pa55word", "Pa5", "5word"):
        assert piece not in message


def test_passwordNotInConfigRepr() -> None:
    c = parse("[upstream]\nproxy = http://alice:Pa55word@proxy.example:3128\n")
    assert c.upstream.proxy is not None
    assert c.upstream.proxy.password == "Pa55word"
    assert "Pa55word" not in repr(c)


# -- the open proxy ----------------------------------------------------------------------------

OPEN = "[proxy]\nlisten = {listen}\nallowed_client_cidrs = {cidrs}\n"


@pytest.mark.parametrize(
    ("listen", "cidrs"),
    [
        ("tcp:3128", "0.0.0.0/0"),
        ("tcp:3128:interface=0.0.0.0", "0.0.0.0/0"),
        ("tcp:3128:interface=192.0.2.1", "0.0.0.0/0"),
        ("tcp6:3128", "::/0"),
        ("tcp6:3128:interface=\\:\\:", "::/0"),
        ("tcp:3128:interface=127.0.0.1 tcp:3129", "0.0.0.0/0"),
        ("tcp:3128", "0.0.0.0/1 128.0.0.0/1"),
        ("tcp:3128", "::ffff:0.0.0.0/96"),
        ("tcp:3128", "10.0.0.0/8 0.0.0.0/0"),
        ("tls:/nonexistent", "::/0"),
    ],
)
def test_openProxyRefused(listen: str, cidrs: str) -> None:
    text = OPEN.format(listen=listen, cidrs=cidrs)
    message = refused(text)
    assert message.startswith(
        f"{FILE}: [proxy] allowed_client_cidrs: refusing to run an open proxy: "
    )
    assert "[auth] htpasswd" in message
    # an explicit override, or a password, lets it start
    parse(text, allowOpenProxy=True)
    parse(text + "[auth]\nhtpasswd = users\n")


@pytest.mark.parametrize(
    ("listen", "cidrs"),
    [
        ("tcp:3128:interface=127.0.0.1", "0.0.0.0/0"),
        ("tcp6:3128:interface=\\:\\:1", "::/0"),
        ("tcp:3128:interface=localhost", "0.0.0.0/0"),
        ("unix:/tmp/pg.sock", "0.0.0.0/0 ::/0"),
        ("tcp:3128", "10.0.0.0/8"),
        ("tcp:3128", "0.0.0.0/1"),
        ("tcp:3128", "::/1"),
    ],
)
def test_notAnOpenProxy(listen: str, cidrs: str) -> None:
    parse(OPEN.format(listen=listen, cidrs=cidrs))


def test_unknownEndpointKindsCountAsExposed() -> None:
    # systemd: cannot be built outside systemd, so it is checked directly.
    assert not configModule._isLocalOnly("systemd:domain=INET:index=0")
    assert configModule._isLocalOnly("unix:/run/pg.sock")


# -- endpoint addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:3128:interface=127.0.0.1", ("127.0.0.1", 3128)),
        ("tcp:3128", (None, 3128)),
        ("tcp:port=3128", (None, 3128)),
        ("tcp:3128:interface=0.0.0.0", (None, 3128)),
        ("tcp6:3128", (None, 3128)),
        ("tcp6:3128:interface=\\:\\:1", ("::1", 3128)),
        ("tcp6:3128:interface=\\:\\:ffff\\:127.0.0.1", ("127.0.0.1", 3128)),
        ("ssl:443:privateKey=k.pem:interface=192.0.2.1", ("192.0.2.1", 443)),
        ("tls:/etc/certs", (None, 443)),
        ("tls:/etc/certs:8443:interface=\\:\\:1", ("::1", 8443)),
        ("tls:/etc/certs:port=8443", (None, 8443)),
        ("tcp:3128:interface=localhost", ("localhost", 3128)),
        ("unix:/tmp/x", None),
        ("systemd:domain=INET:index=0", None),
        ("tcp:abc", None),
    ],
)
def test_endpointAddress(description: str, expected: tuple[str | None, int] | None) -> None:
    assert endpointAddress(description) == expected


def test_selfAddresses() -> None:
    c = parse(
        "[proxy]\nlisten = tcp:3128:interface=127.0.0.1 tcp:0:interface=127.0.0.1 unix:/tmp/p\n"
        "[metrics]\nlisten = tcp6:9530:interface=\\:\\:1\n"
    )
    assert c.selfAddresses() == frozenset({("127.0.0.1", 3128), ("::1", 9530)})


# -- files -------------------------------------------------------------------------------------


def test_loadConfigRelativePaths(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("alice:x\n")
    ini = tmp_path / "pg.ini"
    ini.write_text("[auth]\nhtpasswd = users\n[mitm]\nca_cert = ~/ca.pem\n")
    c = loadConfig(str(ini))
    assert c.path == str(ini)
    assert c.auth.htpasswd == str(tmp_path / "users")
    assert c.mitm.ca_cert == os.path.join(os.path.expanduser("~"), "ca.pem")
    assert c.mitm.ca_key == str(tmp_path / "proxygate-ca.key")


def test_loadConfigMissingFile(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.ini")
    with pytest.raises(ConfigError) as info:
        loadConfig(missing)
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"


def test_loadConfigDirectory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        loadConfig(str(tmp_path))


def test_loadConfigNotUtf8(tmp_path: Path) -> None:
    ini = tmp_path / "pg.ini"
    ini.write_bytes(b"[proxy]\nvia = \xff\n")
    with pytest.raises(ConfigError) as info:
        loadConfig(str(ini))
    assert str(info.value) == f"{ini}: not UTF-8 text (byte 14)"


def test_loadConfigByteOrderMark(tmp_path: Path) -> None:
    ini = tmp_path / "pg.ini"
    ini.write_bytes(b"\xef\xbb\xbf[proxy]\nvia = bom\n")
    assert loadConfig(str(ini)).proxy.via == "bom"


@pytest.mark.parametrize(
    ("section", "key"),
    [("auth", "htpasswd"), ("upstream", "ca_certificate"), ("mitm", "upstream_ca_bundle")],
)
def test_loadConfigNamedFilesMustBeReadable(tmp_path: Path, section: str, key: str) -> None:
    ini = tmp_path / "pg.ini"
    ini.write_text(f"[{section}]\n{key} = missing.pem\n")
    with pytest.raises(ConfigError) as info:
        loadConfig(str(ini))
    assert str(info.value) == (
        f"{ini}: [{section}] {key}: cannot read {tmp_path / 'missing.pem'}: "
        "No such file or directory"
    )
    (tmp_path / "missing.pem").write_text("x")
    assert loadConfig(str(ini)).path == str(ini)
    # parseConfig never touches those files
    parseConfig(f"[{section}]\n{key} = elsewhere.pem\n", str(ini))


def test_drainGraceIsTenSecondsUnlessSet() -> None:
    assert parseConfig("").proxy.drain_grace == 10.0
    assert parseConfig("[proxy]\ndrain_grace = 2.5\n").proxy.drain_grace == 2.5
    with pytest.raises(ConfigError, match=r"\[proxy\] drain_grace"):
        parseConfig("[proxy]\ndrain_grace = soon\n")
