"""Pure policy decisions: IP spellings, host patterns, clients, ports, destinations."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.policy import (
    ALLOWED,
    Decision,
    DestinationPolicy,
    HostPattern,
    checkClient,
    checkPort,
    clientAllowed,
    formatPortRanges,
    normaliseNetwork,
    parseHostPattern,
    parseHostPatterns,
    parseIP,
    parsePortRanges,
    parseTunnelPattern,
    portAllowed,
)

DEFAULT_DENY = parseHostPatterns(
    ["127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/8"]
)


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


# -- parseIP -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7F000001", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0x7f.0.0.0x1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("0.0.0.0", "0.0.0.0"),
        ("10.0.0.255", "10.0.0.255"),
        ("255.255.255.255", "255.255.255.255"),
        ("4294967295", "255.255.255.255"),
        ("::1", "::1"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("[::ffff:127.0.0.1]", "127.0.0.1"),
        ("::ffff:7f00:1", "127.0.0.1"),
        ("::FFFF:10.0.0.1", "10.0.0.1"),
        ("fe80::1%eth0", "fe80::1"),
        ("2001:DB8::1", "2001:db8::1"),
    ],
)
def test_parseIPRecognises(text: str, expected: str) -> None:
    assert parseIP(text) == ip(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "example.com",
        "localhost",
        "256.0.0.1",
        "1.2.3.4.5",
        "4294967296",
        "127.0.0.1..",
        "08.0.0.1",  # 8 is not an octal digit: inet_aton refuses
        "0xg.1",
        "1.2.3.-4",
        " 127.0.0.1",
        "127.0.0.1 ",
        "127.0.0.1\n",
        "[127.0.0.1",
        "::1]",
        ":::1",
        "1.2.3.4x",
        "١٢٧.0.0.1",  # non-ASCII digits
        "127.0.0.256",
        "1.256.0.0",
    ],
)
def test_parseIPRefuses(text: str) -> None:
    assert parseIP(text) is None


def test_normaliseNetworkUnmaps() -> None:
    mapped = ipaddress.ip_network("::ffff:10.0.0.0/104")
    assert normaliseNetwork(mapped) == ipaddress.ip_network("10.0.0.0/8")
    plain = ipaddress.ip_network("fd00::/8")
    assert normaliseNetwork(plain) is plain


# -- host patterns -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "shown"),
    [
        ("*", "any", "*"),
        ("example.com", "exact", "example.com"),
        ("Example.COM.", "exact", "example.com"),
        (".example.com", "suffix", ".example.com"),
        ("*.example.com", "wildcard", "*.example.com"),
        ("under_score.example", "exact", "under_score.example"),
        ("bücher.example", "exact", "xn--bcher-kva.example"),
        ("10.0.0.0/8", "network", "10.0.0.0/8"),
        ("10.1.2.3", "network", "10.1.2.3"),
        ("127.1", "network", "127.0.0.1"),
        ("::1", "network", "::1"),
        ("[::1]", "network", "::1"),
        ("[fd00::]/8", "network", "fd00::/8"),
        ("fe80::/10", "network", "fe80::/10"),
        ("::ffff:127.0.0.0/104", "network", "127.0.0.0/8"),
        ("::ffff:127.0.0.1", "network", "127.0.0.1"),
    ],
)
def test_parseHostPattern(text: str, kind: str, shown: str) -> None:
    pattern = parseHostPattern(text)
    assert pattern.kind == kind
    assert str(pattern) == shown
    assert repr(pattern) == f"HostPattern({shown!r})"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("a..b", "empty label"),
        (".", "empty label"),
        ("*.", "empty label"),
        ("foo.*.com", "bad label"),
        ("exa mple.com", "bad label"),
        ("-bad.com", "bad label"),
        ("ex!ample.com", "bad label"),
        ("example.com:443", "ports are not allowed"),
        ("http://example.com", "a URL"),
        ("http:example.com", "not an IP address"),
        ("[example.com]", "not an IP address"),
        ("10.0.0.1/8", "did you mean 10.0.0.0/8?"),
        ("10.0.0.0/33", "invalid host pattern"),
        ("10.0.0.0/", "bad prefix length"),
        ("10.0.0.0/x", "bad prefix length"),
        ("fe80::1/10", "did you mean fe80::/10?"),
        ("256.1.1.1", "all-digit label"),
        ("1.2.3.4.5", "all-digit label"),
        ("a" * 64 + ".com", "bad label"),
        (".".join(["a" * 60] * 5), "longer than 253"),
    ],
)
def test_parseHostPatternRefuses(text: str, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parseHostPattern(text)
    message = str(info.value)
    assert "\n" not in message
    assert problem in message
    assert message.startswith(f"invalid host pattern {text!r}")


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "EXAMPLE.com.", True),
        ("example.com", "www.example.com", False),
        ("example.com", "badexample.com", False),
        (".example.com", "example.com", True),
        (".example.com", "a.b.example.com", True),
        (".example.com", "Example.Com.", True),
        (".example.com", "badexample.com", False),
        ("*.example.com", "example.com", False),
        ("*.example.com", "www.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "badexample.com", False),
        ("*", "anything.at.all", True),
        ("10.0.0.0/8", "10.0.0.1", False),  # networks never match names
        ("bücher.example", "xn--bcher-kva.example", True),
        ("xn--bcher-kva.example", "BÜCHER.example", True),
    ],
)
def test_matchesName(pattern: str, host: str, expected: bool) -> None:
    assert parseHostPattern(pattern).matchesName(host) is expected


@pytest.mark.parametrize(
    ("pattern", "address", "expected"),
    [
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("10.0.0.0/8", "::1", False),
        ("::1", "::1", True),
        ("::1", "127.0.0.1", False),
        ("*", "192.0.2.1", True),
        ("example.com", "192.0.2.1", False),
    ],
)
def test_matchesAddress(pattern: str, address: str, expected: bool) -> None:
    assert parseHostPattern(pattern).matchesAddress(ip(address)) is expected


@pytest.mark.parametrize(
    "text, host, port, expected",
    [
        ("example.com", "example.com", 21, True),  # no port: every port
        ("example.com:21", "example.com", 21, True),
        ("example.com:21", "example.com", 443, False),
        ("*:21", "anything.test", 21, True),
        ("*:21", "10.1.2.3", 21, True),
        ("*:21", "anything.test", 443, False),
        (".example.com:8443", "a.example.com", 8443, True),
        ("*.example.com:8443", "example.com", 8443, False),
        ("[::1]:22", "::1", 22, True),
        ("[::1]:22", "::1", 23, False),
        ("::1", "::1", 22, True),  # an IPv6 address without brackets has no port
        ("10.0.0.0/8:25", "10.9.8.7", 25, True),
        ("10.0.0.0/8:25", "10.9.8.7", 587, False),
        ("127.0.0.1:2121", "127.0.0.1", 2121, True),
    ],
)
def test_tunnelPatterns(text: str, host: str, port: int, expected: bool) -> None:
    assert parseTunnelPattern(text).matches(host, port) is expected


@pytest.mark.parametrize("text", ["example.com:0", "example.com:x", "*:70000", "[::1]:", "a:b:c"])
def test_tunnelPatternsRefuse(text: str) -> None:
    with pytest.raises(ValueError, match="invalid host pattern"):
        parseTunnelPattern(text)


def test_tunnelPatternsShowAsWritten() -> None:
    shown = [str(parseTunnelPattern(t)) for t in ("*:21", "[::1]:22", ".a.test:8443", "b.test")]
    assert shown == ["*:21", "[::1]:22", ".a.test:8443", "b.test"]


def test_parseHostPatternsKeepsOrder() -> None:
    assert parseHostPatterns(["b.example", ".a.example", "10.0.0.0/8"]) == (
        HostPattern("exact", name="b.example"),
        HostPattern("suffix", name="a.example"),
        HostPattern("network", network=ipaddress.ip_network("10.0.0.0/8")),
    )
    assert parseHostPatterns([]) == ()


# -- clients -----------------------------------------------------------------------------------

LOOPBACK_CLIENTS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize(
    ("cidrs", "peer", "expected"),
    [
        (LOOPBACK_CLIENTS, "127.0.0.1", True),
        (LOOPBACK_CLIENTS, "127.9.9.9", True),
        (LOOPBACK_CLIENTS, "::1", True),
        (LOOPBACK_CLIENTS, "::ffff:127.0.0.1", True),
        (LOOPBACK_CLIENTS, "10.0.0.1", False),
        (LOOPBACK_CLIENTS, "::ffff:10.0.0.1", False),
        (LOOPBACK_CLIENTS, "::2", False),
        (LOOPBACK_CLIENTS, "", False),
        (LOOPBACK_CLIENTS, "/tmp/proxy.sock", False),
        ((ipaddress.ip_network("10.0.0.0/8"),), "::ffff:10.0.0.1", True),
        ((ipaddress.ip_network("0.0.0.0/0"),), "192.0.2.1", True),
        ((ipaddress.ip_network("0.0.0.0/0"),), "2001:db8::1", False),
        ((), "127.0.0.1", False),
    ],
)
def test_clientAllowed(cidrs: tuple, peer: str, expected: bool) -> None:
    assert clientAllowed(cidrs, peer) is expected
    decision = checkClient(cidrs, peer)
    assert decision.allowed is expected
    if not expected:
        assert decision.reason == "client"
        assert "allowed_client_cidrs" in decision.detail


def test_checkClientDetail() -> None:
    assert checkClient(LOOPBACK_CLIENTS, "10.0.0.5") == Decision(
        False, "client", "client 10.0.0.5 is not in allowed_client_cidrs"
    )
    assert checkClient(LOOPBACK_CLIENTS, "127.0.0.1") == ALLOWED


# -- ports -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["443"], ((443, 443),)),
        (["443", "8443", "1024-65535"], ((443, 443), (8443, 8443), (1024, 65535))),
        (["1-1"], ((1, 1),)),
        ([" 80 - 90 "], ((80, 90),)),
        ([], ()),
    ],
)
def test_parsePortRanges(items: list[str], expected: tuple) -> None:
    assert parsePortRanges(items) == expected


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ("0", "not in 1-65535"),
        ("65536", "not in 1-65535"),
        ("100-70000", "not in 1-65535"),
        ("0-10", "not in 1-65535"),
        ("90-80", "reversed"),
        ("http", "not a port number"),
        ("-5", "not a port number"),
        ("5-", "not a port number"),
        ("1-2-3", "not a port number"),
        ("\uff14\uff14\uff13", "not a port number"),  # fullwidth digits: isdigit() is True
    ],
)
def test_parsePortRangesRefuses(item: str, problem: str) -> None:
    with pytest.raises(ValueError, match="invalid port range") as info:
        parsePortRanges([item])
    assert problem in str(info.value)
    assert repr(item) in str(info.value)


@pytest.mark.parametrize(
    ("port", "expected"),
    [(443, True), (8443, True), (1024, True), (65535, True), (80, False), (1023, False)],
)
def test_portAllowed(port: int, expected: bool) -> None:
    ranges = ((443, 443), (8443, 8443), (1024, 65535))
    assert portAllowed(ranges, port) is expected
    assert checkPort(ranges, port).allowed is expected


def test_checkPortDetail() -> None:
    assert checkPort(((443, 443), (1024, 2048)), 25) == Decision(
        False, "port", "port 25 is not in connect_ports (443 1024-2048)"
    )
    assert checkPort((), 443).detail == "port 443 is not in connect_ports (nothing)"
    assert formatPortRanges(((1, 1), (5, 9))) == "1 5-9"


# -- destinations ------------------------------------------------------------------------------

DEFAULTS = DestinationPolicy(allow=(), deny=DEFAULT_DENY)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f.1",
        "0x7f000001",
        "0177.0.0.1",
        "017700000001",
        "127.0.0.1.",
        "[::1]",
        "::1",
        "[::ffff:127.0.0.1]",
        "::ffff:7f00:1",
        "169.254.169.254",
        "0.0.0.0",
        "0",
        "fe80::1",
        "[fe80::1%25eth0]".replace("%25", "%"),
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "::",  # unspecified: reaches this host
    ],
)
def test_defaultDenyCatchesSpellings(host: str) -> None:
    decision = DEFAULTS.checkName(host, 80)
    assert not decision.allowed
    assert decision.reason == "destination"
    assert host in decision.detail


@pytest.mark.parametrize("host", ["example.com", "93.184.216.34", "2001:db8::1", "[2001:db8::1]"])
def test_defaultAllowsPublic(host: str) -> None:
    assert DEFAULTS.checkName(host, 443) == ALLOWED


def test_denyDetails() -> None:
    assert DEFAULTS.checkName("127.0.0.1", 80).detail == (
        "destination 127.0.0.1 is denied by deny_destinations (127.0.0.0/8)"
    )
    assert DEFAULTS.checkName("2130706433", 80).detail == (
        "destination 2130706433 (127.0.0.1) is denied by deny_destinations (127.0.0.0/8)"
    )
    assert DEFAULTS.checkAddress("evil.example", "127.0.0.1", 80).detail == (
        "destination evil.example (127.0.0.1) is denied by deny_destinations (127.0.0.0/8)"
    )
    assert DEFAULTS.checkAddress("x.example", "::", 80).detail == (
        "destination x.example (::) is an unspecified address, which reaches this host"
    )


def test_detailEscapesHostileHosts() -> None:
    policy = DestinationPolicy(allow=(), deny=parseHostPatterns(["*"]))
    detail = policy.checkName("a\r\nb c" + "x" * 400, 80).detail
    assert "\r" not in detail and "\n" not in detail and "b c" not in detail
    assert "\\x0d\\x0a" in detail
    assert len(detail) < 350


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("rebind.example", "127.0.0.1"),
        ("rebind.example", "::1"),
        ("rebind.example", "::ffff:127.0.0.1"),
        ("rebind.example", "169.254.169.254"),
        ("rebind.example", "0.0.0.0"),
        ("rebind.example", "::"),
        ("rebind.example", "fe80::1"),
        ("rebind.example", "64:ff9b::a9fe:a9fe"),  # NAT64 of 169.254.169.254
    ],
)
def test_checkAddressDeniesRebinding(host: str, address: str) -> None:
    assert DEFAULTS.checkName(host, 80).allowed
    decision = DEFAULTS.checkAddress(host, address, 80)
    assert not decision.allowed
    assert decision.reason == "destination"


def test_checkAddressRefusesNonAddress() -> None:
    decision = DEFAULTS.checkAddress("example.com", "example.com", 80)
    assert not decision.allowed
    assert "is not an address" in decision.detail


def test_emptyHostDenied() -> None:
    assert DEFAULTS.checkName("", 80) == Decision(False, "destination", "destination host is empty")


# allow/deny tables: (allow, deny, host, dialled address, name decision, address decision)
# A name decision of True is provisional: checkAddress has the last word.
ALLOW_DENY = [
    # empty allow: anything not denied
    ((), (), "example.com", "192.0.2.1", True, True),
    # name allow-list
    (("example.com",), (), "example.com", "192.0.2.1", True, True),
    (("example.com",), (), "www.example.com", "192.0.2.1", False, False),
    ((".example.com",), (), "www.example.com", "192.0.2.1", True, True),
    (("*.example.com",), (), "example.com", "192.0.2.1", False, False),
    (("*.example.com",), (), "EXAMPLE.com.", "192.0.2.1", False, False),
    (("*.example.com",), (), "WWW.Example.com.", "192.0.2.1", True, True),
    (("example.com",), (), "badexample.com", "192.0.2.1", False, False),
    # network allow-list: a name must wait for its address
    (("192.0.2.0/24",), (), "example.com", "192.0.2.1", True, True),
    (("192.0.2.0/24",), (), "example.com", "198.51.100.1", True, False),
    (("192.0.2.0/24",), (), "192.0.2.7", "192.0.2.7", True, True),
    (("192.0.2.0/24",), (), "198.51.100.1", "198.51.100.1", False, False),
    (("example.com", "10.0.0.0/8"), (), "other.example", "10.1.1.1", True, True),
    (("example.com", "10.0.0.0/8"), (), "example.com", "192.0.2.1", True, True),
    (("example.com", "10.0.0.0/8"), (), "other.example", "192.0.2.1", True, False),
    # IP literal host, allowed by name pattern? never: names do not match addresses
    (("example.com",), (), "192.0.2.1", "192.0.2.1", False, False),
    # deny wins over allow, by name and by address
    ((".example.com",), ("bad.example.com",), "bad.example.com", "192.0.2.1", False, False),
    ((".example.com",), ("bad.example.com",), "ok.example.com", "192.0.2.1", True, True),
    ((".example.com",), ("192.0.2.0/24",), "ok.example.com", "192.0.2.9", True, False),
    (("10.0.0.0/8",), ("10.0.0.0/16",), "10.0.0.1", "10.0.0.1", False, False),
    (("10.0.0.0/8",), ("10.0.0.0/16",), "10.1.0.1", "10.1.0.1", True, True),
    (("*",), ("*.internal",), "db.internal", "192.0.2.1", False, False),
    (("*",), ("127.0.0.0/8",), "localhost", "127.0.0.1", True, False),
    ((), ("*",), "example.com", "192.0.2.1", False, False),
    # allow cannot undo the built-in unspecified rule
    (("0.0.0.0/0", "::/0"), (), "x.example", "0.0.0.0", True, False),
    (("0.0.0.0/0", "::/0"), (), "::", "::", False, False),
]


@pytest.mark.parametrize(("allow", "deny", "host", "address", "byName", "byAddress"), ALLOW_DENY)
def test_allowDeny(
    allow: tuple[str, ...],
    deny: tuple[str, ...],
    host: str,
    address: str,
    byName: bool,
    byAddress: bool,
) -> None:
    policy = DestinationPolicy(allow=parseHostPatterns(allow), deny=parseHostPatterns(deny))
    name = policy.checkName(host, 443)
    final = policy.checkAddress(host, address, 443)
    assert name.allowed is byName
    assert final.allowed is byAddress
    for decision in (name, final):
        if decision.allowed:
            assert decision == ALLOWED
        else:
            assert decision.reason == "destination"
            assert decision.detail.startswith("destination ")
            assert "\n" not in decision.detail


def test_notInAllowDetail() -> None:
    policy = DestinationPolicy(allow=parseHostPatterns(["example.com"]), deny=())
    assert policy.checkName("other.example", 443).detail == (
        "destination other.example is not in allow_destinations"
    )


# -- the proxy's own addresses -----------------------------------------------------------------

# (listeners, dialled address, port, denied?)
SELF = [
    ({(None, 3128)}, "127.0.0.1", 3128, True),
    ({(None, 3128)}, "127.0.0.2", 3128, True),
    ({(None, 3128)}, "::1", 3128, True),
    ({(None, 3128)}, "::ffff:127.0.0.1", 3128, True),
    ({(None, 3128)}, "0.0.0.0", 3128, True),
    ({(None, 3128)}, "::", 3128, True),
    ({(None, 3128)}, "192.0.2.1", 3128, False),  # another host's port 3128
    ({(None, 3128)}, "127.0.0.1", 3129, False),
    ({("0.0.0.0", 3128)}, "127.0.0.1", 3128, True),  # 0.0.0.0 means wildcard
    ({("::", 3128)}, "::1", 3128, True),
    ({("", 3128)}, "127.0.0.1", 3128, True),
    ({("127.0.0.1", 3128)}, "127.0.0.1", 3128, True),
    ({("127.0.0.1", 3128)}, "0.0.0.0", 3128, True),
    ({("127.0.0.1", 3128)}, "127.0.0.2", 3128, False),
    ({("127.0.0.1", 3128)}, "::1", 3128, False),
    ({("192.0.2.5", 3128)}, "192.0.2.5", 3128, True),
    ({("192.0.2.5", 3128)}, "::ffff:192.0.2.5", 3128, True),
    ({("192.0.2.5", 3128)}, "192.0.2.6", 3128, False),
    ({("::ffff:192.0.2.5", 9530)}, "192.0.2.5", 9530, True),
    ({("localhost", 9530)}, "::1", 9530, True),
    ({("localhost", 9530)}, "127.0.0.1", 9530, True),
]


@pytest.mark.parametrize(("listeners", "address", "port", "denied"), SELF)
def test_selfAddressesDeniedWhateverAllowSays(
    listeners: set, address: str, port: int, denied: bool
) -> None:
    # Allow everything and deny nothing: only the self rule can refuse.
    policy = DestinationPolicy(allow=parseHostPatterns(["*"]), deny=()).withSelfAddresses(listeners)
    decision = policy.checkAddress("me.example", address, port)
    if address in ("0.0.0.0", "::"):
        assert not decision.allowed  # the unspecified rule alone already denies
    else:
        assert decision.allowed is not denied
    if denied:
        assert "is this proxy itself" in decision.detail
        # An IP literal host is checked against the same rule before DNS.
        assert not policy.checkName(address, port).allowed


def test_withSelfAddressesAddsAndNormalises() -> None:
    policy = DestinationPolicy(allow=(), deny=())
    first = policy.withSelfAddresses([("0.0.0.0", 3128)])
    both = first.withSelfAddresses([("::ffff:10.0.0.1", 9530)])
    assert policy.selfAddresses == frozenset()
    assert first.selfAddresses == frozenset({(None, 3128)})
    assert both.selfAddresses == frozenset({(None, 3128), ("10.0.0.1", 9530)})
    with pytest.raises(ValueError, match="not an IP address"):
        policy.withSelfAddresses([("proxy.example", 3128)])


def test_selfDetail() -> None:
    policy = DEFAULTS.withSelfAddresses([(None, 3128)])
    assert policy.checkAddress("me", "127.0.0.1", 3128).detail == (
        "destination me (127.0.0.1) port 3128 is this proxy itself"
    )
