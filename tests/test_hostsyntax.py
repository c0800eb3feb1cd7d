"""
Host names that used to crash the resolver path (issue 19, item 5).

`[::ffff:127.0.0..0..0..0.1]` passed the character check of a bracketed host, was taken for
a name, and getaddrinfo's IDNA encoding raised UnicodeError in the resolver thread: an
"Unhandled error in Deferred" in the log and a 504 ten seconds later. Now:

- L{parseAuthority} answers 400 for anything the resolver could not take: a bracketed host
  that is not an IPv6 address, empty or over-long labels, names over 253 characters, names
  ending in a number that are no IPv4 address. Hypothesis checks the property over
  arbitrary authorities: whatever it accepts is an IP literal or a name IDNA can encode.
- The dialer's resolver refuses such a name itself (a 502 "dns" DialError at once), and a
  name resolver that raises is a DialError too: the second line of defence.
- End to end, the shapes from the field get a 400 at once and the log stays free of
  tracebacks.
"""

from __future__ import annotations

import ipaddress
import socket
import time

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.protocol import Protocol

from gateway.http1.headers import parseAbsoluteTarget, parseAuthority
from gateway.http1.parse import HTTPError
from gateway.policy import DestinationPolicy, parseIP
from gateway.proxy.dial import Dialer, DialError
from tests.support import LOOPBACK_INI, readResponse

FIELD_SHAPES = [
    b"[::ffff:127.0.0..0..0..0.1]:80",
    b"[::ffff:127." + b"a" * 64 + b"]",
    b"[dead.beef]",
    b"[dead.beef]:80",
    b"[v1.fe80::1]",
    b"[::1%25lo]",
    b"[::1",
    b"[]",
    b"[::1]x",
    b"a..b",
    b".a",
    b"a" * 64 + b".com",
    b".".join([b"a" * 63] * 5),
    b"1.2.3.999",
    b"example.123",
    b"example.0x1f",
    b"ex ample.com",
    b"\xc3\xa9.com",
]


@pytest.mark.parametrize("authority", FIELD_SHAPES)
def test_unresolvableAuthoritiesAre400(authority):
    with pytest.raises(HTTPError) as e:
        parseAuthority(authority, 80)
    assert e.value.status == 400


@pytest.mark.parametrize(
    ("authority", "host"),
    [
        (b"[::1]:8080", "::1"),
        (b"[::ffff:127.0.0.1]", "::ffff:127.0.0.1"),
        (b"[2001:DB8::1]", "2001:db8::1"),
        (b"127.1", "127.1"),
        (b"0x7f.1", "0x7f.1"),
        (b"example.com.", "example.com."),
        (b"under_score.internal", "under_score.internal"),
        (b"a1.b2.c3d", "a1.b2.c3d"),
    ],
)
def test_validAuthoritiesPass(authority, host):
    assert parseAuthority(authority, 80)[0] == host


def _resolverSafe(host: str) -> bool:
    """What the resolver path can take: an IP literal, or a name IDNA encodes."""
    if parseIP(host) is not None:
        return True
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    name = host[:-1] if host.endswith(".") else host
    return len(name) <= 253 and all(0 < len(label) < 64 for label in name.split("."))


_hostBytes = st.one_of(
    st.binary(max_size=80),
    st.text(alphabet="0123456789abcdefABCDEF:.[]x%", max_size=60).map(str.encode),
    st.lists(st.text(alphabet="ab1-_", max_size=70), max_size=6).map(
        lambda labels: ".".join(labels).encode()
    ),
)


@settings(max_examples=3000, deadline=None)
@given(authority=_hostBytes, port=st.one_of(st.none(), st.integers(0, 70000)))
def test_acceptedHostsAreResolverSafe(authority, port):
    if port is not None:
        authority += b":%d" % port
    try:
        host, _ = parseAuthority(authority, 80)
    except HTTPError as e:
        assert e.status == 400
        return
    assert _resolverSafe(host), host
    if authority.startswith(b"["):
        ipaddress.IPv6Address(host)


@settings(max_examples=1000, deadline=None)
@given(rest=st.binary(max_size=60))
def test_absoluteTargetsAreResolverSafe(rest):
    try:
        target = parseAbsoluteTarget(b"http://" + rest)
    except HTTPError as e:
        assert e.status == 400
        return
    assert _resolverSafe(target.host), target.host


# -- the dialer: the second line -----------------------------------------------------------


class _RaisingResolver:
    def resolveHostName(self, *args, **kwargs):
        raise ValueError("a resolver that raises")


class _FakeReactor:
    """The real reactor with a name resolver that raises (only the resolver differs)."""

    nameResolver = _RaisingResolver()

    def __getattr__(self, name):
        return getattr(reactor, name)


@pytest.mark.parametrize("host", ["::ffff:127.0.0..0..0..0.1", "a..b", "a" * 64, ".", "x\x00y"])
@pytest_twisted.inlineCallbacks
def test_dialerRefusesUnresolvableNamesAtOnce(host):
    dialer = Dialer(reactor, DestinationPolicy((), ()), 10)
    started = time.monotonic()
    with pytest.raises(DialError) as e:
        yield dialer.connect(host, 80, Protocol())
    assert (e.value.reason, e.value.status) == ("dns", 502)
    assert time.monotonic() - started < 1


@pytest_twisted.inlineCallbacks
def test_dialerTurnsAResolverExceptionIntoDialError():
    dialer = Dialer(_FakeReactor(), DestinationPolicy((), ()), 10)
    with pytest.raises(DialError) as e:
        yield dialer.connect("example.invalid", 80, Protocol())
    assert (e.value.reason, e.value.status) == ("dns", 502)


# -- end to end ----------------------------------------------------------------------------


def _ask(port: int, request: bytes) -> tuple[int, bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        status, _, body = readResponse(sock)
    return status, body, time.monotonic() - started


def test_fieldShapesGet400AtOnceAndNoTraceback(startProxy):
    proxy = startProxy(LOOPBACK_INI + "connect_timeout = 10\n")
    targets = [
        b"TRACE http://[::ffff:127.0.0..0..0..0.1]:80/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://[::ffff:127." + b"a" * 64 + b"]/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://[dead.beef]/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://a..b/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://example.com/ HTTP/1.1\r\nHost: [dead.beef]\r\n\r\n",
        b"CONNECT [dead.beef]:443 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT [::ffff:127.0.0..0..0..0.1]:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
    for request in targets:
        status, body, seconds = _ask(proxy.port, request)
        assert status == 400, (request, status, body)
        assert seconds < 2, (request, seconds)
    proxy.settle()
    log = proxy.log()
    assert "Unhandled error" not in log and "Traceback" not in log, log


def test_randomAuthoritiesNeverCrashTheProxy(startProxy):
    """
    300 random authorities, biased to the shapes that broke (brackets, dots, colons, hex),
    as absolute targets, Host fields and CONNECT targets: each is answered at once (400, or
    403 since only a name nobody asks for is allowed: no name reaches this machine's DNS),
    and the log has no traceback.
    """
    import random

    rnd = random.Random(19)
    alphabet = "[]:.0123456789abcdefx-_%@"
    proxy = startProxy("[proxy]\nallow_destinations = example.invalid\nconnect_ports = 443\n")
    for i in range(300):
        host = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 40))).encode()
        if i % 3 == 0:
            raw = b"GET http://" + host + b"/ HTTP/1.1\r\nHost: x\r\n\r\n"
        elif i % 3 == 1:
            raw = b"GET http://192.0.2.1/ HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
        else:
            raw = b"CONNECT " + host + b":443 HTTP/1.1\r\nHost: x\r\n\r\n"
        status, body, seconds = _ask(proxy.port, raw)
        assert status in (400, 403), (raw, status, body)
        assert seconds < 2, (raw, seconds)
    proxy.settle()
    assert "Traceback" not in proxy.log() and "Unhandled error" not in proxy.log()
