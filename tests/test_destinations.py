"""
Destination policy end to end (the real proxy under twistd) and the dialler in memory.

- With the default policy, every spelling of loopback, the unspecified address and the
  metadata address is refused with 403, for plain HTTP and CONNECT, before anything is
  dialled; each refusal is counted in ``proxygate_denied_total{reason="destination"}``.
- The proxy's own listeners and its metrics port are never reachable through it, even with
  ``deny_destinations`` empty.
- ``allow_destinations`` is a one-line egress allow-list (names, ``.suffix``, ``*.wildcard``,
  CIDRs); deny wins over allow.
- The dialler resolves a name once, checks every address, and dials only addresses it
  checked (tested with a fake resolver and fake endpoints: making a name resolve to several
  loopback addresses for real would need /etc/hosts).
"""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest
from twisted.internet import defer, error
from twisted.internet.task import Clock

from gateway.config import loadConfig
from gateway.policy import DestinationPolicy, parseHostPatterns
from gateway.proxy import dial
from gateway.proxy.dial import DestinationDenied, Dialer, DialError
from tests.support import ProxyProcess, readResponse

# -- helpers ---------------------------------------------------------------------------------


def send(port: int, request: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request.encode("latin-1"))
        return readResponse(s)


def get(proxy, url: str) -> tuple[int, dict[str, str], bytes]:
    return send(proxy.port, f"GET {url} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")


def connect(proxy, authority: str, then: str | None = None) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        status, headers, body = readResponse(s)
        if status == 200 and then is not None:
            s.sendall(then.encode())
            return readResponse(s)
        return status, headers, body


def originSaw(origin, marker: str) -> list:
    return [r for r in origin.requests if marker in r[1]]


@pytest.fixture(scope="module")
def defaultPolicyProxy(tmp_path_factory):
    """Default destination policy; every port open to CONNECT so the policy is what decides."""
    p = ProxyProcess(
        tmp_path_factory.mktemp("defaultpolicy"),
        "[proxy]\nconnect_ports = 1-65535\n\n[log]\nformat = json\n",
    ).start()
    yield p
    p.stop()


# -- the default policy ----------------------------------------------------------------------

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "2130706433",
    "0x7f.1",
    "0x7f000001",
    "127.1",
    "0177.0.0.1",
    "017700000001",
    "127.0.0.1.",
    "127.255.255.254",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "[64:ff9b::7f00:1]",
    "0.0.0.0",
    "0",
    "[::]",
    "localhost",
    "LOCALHOST",
    "localhost.",
]
METADATA_SPELLINGS = [
    "169.254.169.254",
    "0xa9fea9fe",
    "2852039166",
    "169.254.43518",
    "[::ffff:169.254.169.254]",
    "[fe80::1]",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS + METADATA_SPELLINGS)
def test_defaultPolicyRefusesForwarding(defaultPolicyProxy, origin, host: str) -> None:
    """The origin listens on 127.0.0.1 at this port: any leak would reach it."""
    marker = uuid.uuid4().hex
    before = defaultPolicyProxy.metric("proxygate_denied_total", reason="destination")
    status, _, body = get(defaultPolicyProxy, f"http://{host}:{origin.port}/{marker}")
    assert originSaw(origin, marker) == []
    if host == "localhost." and status == 502:
        pytest.skip("this resolver does not know 'localhost.' (refused: nothing to reach)")
    assert status == 403, body
    assert body.startswith(b"Destination denied")
    after = defaultPolicyProxy.metric("proxygate_denied_total", reason="destination")
    assert after == before + 1


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS + METADATA_SPELLINGS)
def test_defaultPolicyRefusesTunnels(defaultPolicyProxy, origin, host: str) -> None:
    marker = uuid.uuid4().hex
    status, _, _ = connect(
        defaultPolicyProxy, f"{host}:{origin.port}", f"GET /{marker} HTTP/1.0\r\n\r\n"
    )
    assert originSaw(origin, marker) == []
    if host == "localhost." and status == 502:
        pytest.skip("this resolver does not know 'localhost.' (refused: nothing to reach)")
    assert status == 403


def test_defaultPolicyRefusesOnTheDefaultPort(defaultPolicyProxy) -> None:
    """Nothing listens on :80 / :443 here: a 403 shows it was refused, not unreachable."""
    assert get(defaultPolicyProxy, "http://169.254.169.254/latest/meta-data/")[0] == 403
    assert get(defaultPolicyProxy, "http://2130706433/")[0] == 403
    assert connect(defaultPolicyProxy, "127.1:443")[0] == 403
    assert connect(defaultPolicyProxy, "[::1]:443")[0] == 403


@pytest.mark.parametrize(
    "url",
    [
        "http://user@127.0.0.1:{o}/{m}",
        "http://example.invalid:80@127.0.0.1:{o}/{m}",
        "http://127.0.0.1:{o}#@example.invalid/{m}",
        "http://127.0.0.1%2e:{o}/{m}",
        "http://127.0.0.1:{o}\\@example.invalid/{m}",
        "HTTP://127.0.0.1:{o}/{m}",
    ],
)
def test_urlTricksDoNotReachLoopback(defaultPolicyProxy, origin, url: str) -> None:
    marker = uuid.uuid4().hex
    status, _, _ = get(defaultPolicyProxy, url.format(o=origin.port, m=marker))
    assert status in (400, 403)
    assert originSaw(origin, marker) == []


def test_refusalsAreLoggedWithTheirReason(defaultPolicyProxy, origin) -> None:
    seen = len(defaultPolicyProxy.accessLines())
    assert get(defaultPolicyProxy, f"http://0x7f.1:{origin.port}/x")[0] == 403
    assert connect(defaultPolicyProxy, f"localhost:{origin.port}")[0] == 403

    def records() -> list[dict]:
        lines = defaultPolicyProxy.accessLines()[seen:]
        return [json.loads(line.partition("] ")[2]) for line in lines]

    deadline = time.monotonic() + 5
    while len(records()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    found = records()
    assert [(r["method"], r["code"]) for r in found] == [("GET", 403), ("CONNECT", 403)]
    assert [r["reason"] for r in found] == ["destination", "destination_ip"]
    assert "0x7f.1 (127.0.0.1)" in found[0]["detail"]
    assert "deny_destinations" in found[0]["detail"]
    assert "localhost (127.0.0.1)" in found[1]["detail"]


# -- the proxy's own ports -------------------------------------------------------------------


@pytest.fixture(scope="module")
def openProxy(tmp_path_factory):
    """Nothing denied at all: only the self-protection stands between a client and the proxy."""
    p = ProxyProcess(
        tmp_path_factory.mktemp("openproxy"),
        "[proxy]\ndeny_destinations =\nconnect_ports = 1-65535\n",
    ).start()
    yield p
    p.stop()


def test_openPolicyStillReachesOrigins(openProxy, origin) -> None:
    """The control: loopback origins are reachable when nothing is denied."""
    assert get(openProxy, origin.url("/echo"))[0] == 200
    assert get(openProxy, f"http://localhost:{origin.port}/echo")[0] == 200
    status, _, body = connect(openProxy, f"127.0.0.1:{origin.port}", "GET /echo HTTP/1.0\r\n\r\n")
    assert status == 200
    assert json.loads(body)["path"] == "/echo"


@pytest.mark.parametrize("which", ["proxy", "metrics"])
@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "127.1", "2130706433", "[::ffff:127.0.0.1]", "0.0.0.0"]
)
def test_selfIsNeverReachable(openProxy, which: str, host: str) -> None:
    port = openProxy.port if which == "proxy" else openProxy.metricsPort
    before = openProxy.metric("proxygate_denied_total", reason="destination")
    status, _, body = get(openProxy, f"http://{host}:{port}/metrics")
    assert status == 403, body
    assert b"this proxy itself" in body
    status, _, body = connect(openProxy, f"{host}:{port}", "GET /metrics HTTP/1.0\r\n\r\n")
    assert status == 403
    assert b"proxygate_" not in body
    assert openProxy.metric("proxygate_denied_total", reason="destination") == before + 2


def test_selfThroughTheIssueExamples(openProxy) -> None:
    assert get(openProxy, f"http://127.0.0.1:{openProxy.port}/")[0] == 403
    assert get(openProxy, f"http://127.0.0.1:{openProxy.metricsPort}/metrics")[0] == 403
    assert connect(openProxy, f"127.0.0.1:{openProxy.metricsPort}")[0] == 403


# -- allow-lists -----------------------------------------------------------------------------


def test_allowListOfOneName(startProxy, origin) -> None:
    """
    "Only our artifact host" is one line. localhost resolves to loopback, so loopback is
    taken out of deny_destinations; everything else, 127.0.0.2 included, is refused before
    anything is dialled (nothing listens on 127.0.0.2 at that port: a 403, not a 502).
    """
    proxy = startProxy(
        "[proxy]\nallow_destinations = localhost\ndeny_destinations = 169.254.0.0/16\n"
        "connect_ports = 1-65535\n"
    )
    status, _, body = get(proxy, f"http://localhost:{origin.port}/echo")
    assert status == 200
    assert json.loads(body)["path"] == "/echo"
    status, _, body = connect(proxy, f"localhost:{origin.port}", "GET /echo HTTP/1.0\r\n\r\n")
    assert status == 200
    before = proxy.metric("proxygate_denied_total", reason="destination")
    for url in (
        f"http://127.0.0.2:{origin.port}/",
        f"http://127.0.0.1:{origin.port}/",  # the address is not the allowed name
        f"http://sub.localhost:{origin.port}/",
        f"http://localhost.example.invalid:{origin.port}/",
        "http://pypi.org/",
    ):
        assert get(proxy, url)[0] == 403, url
    assert connect(proxy, f"127.0.0.2:{origin.port}")[0] == 403
    assert get(proxy, f"http://localhost:{proxy.metricsPort}/metrics")[0] == 403
    assert proxy.metric("proxygate_denied_total", reason="destination") == before + 7


def test_allowListOfOneNetwork(startProxy, origin) -> None:
    proxy = startProxy(
        "[proxy]\nallow_destinations = 127.0.0.1/32\ndeny_destinations =\nconnect_ports = 1-65535\n"
    )
    assert get(proxy, f"http://127.0.0.1:{origin.port}/echo")[0] == 200
    assert get(proxy, f"http://localhost:{origin.port}/echo")[0] == 200  # resolves into it
    assert get(proxy, f"http://127.1:{origin.port}/echo")[0] == 200  # same address
    assert get(proxy, f"http://127.0.0.2:{origin.port}/echo")[0] == 403
    assert get(proxy, f"http://[::1]:{origin.port}/echo")[0] == 403
    assert get(proxy, "http://pypi.org/")[0] == 403  # resolves outside the network
    assert connect(proxy, f"127.0.0.2:{origin.port}")[0] == 403


def test_namePatterns(startProxy) -> None:
    """
    .suffix matches the name and its subdomains, *.wildcard only subdomains, deny wins.
    The .invalid names never resolve: allowed ones get 502 (resolution failed), refused
    ones 403 before any lookup.
    """
    proxy = startProxy(
        "[proxy]\nallow_destinations = .artifacts.invalid *.mirror.invalid\n"
        "deny_destinations = secret.artifacts.invalid 127.0.0.0/8\n"
    )
    expected = {
        "artifacts.invalid": 502,
        "a.artifacts.invalid": 502,
        "a.b.artifacts.invalid": 502,
        "ARTIFACTS.INVALID.": 502,
        "mirror.invalid": 403,
        "x.mirror.invalid": 502,
        "secret.artifacts.invalid": 403,
        "Secret.Artifacts.Invalid": 403,
        "notartifacts.invalid": 403,
        "artifacts.invalid.evil.invalid": 403,
        "example.invalid": 403,
    }
    got = {host: get(proxy, f"http://{host}/")[0] for host in expected}
    assert got == expected
    assert connect(proxy, "a.artifacts.invalid:443")[0] == 502
    assert connect(proxy, "other.invalid:443")[0] == 403


# -- the dialler, in memory ------------------------------------------------------------------


class FakeResolver:
    """Answers from a script, one answer per call, and counts the calls."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []

    def resolve(self, host: str) -> defer.Deferred:
        self.calls.append(host)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return defer.succeed(list(answer))


class FakeEndpoint:
    """Stands in for TCP4/6ClientEndpoint: records the address; refuses the ones listed."""

    dialled: list[tuple[str, int]] = []
    refuse: set[str] = set()

    def __init__(self, reactor, host: str, port: int, timeout: float = 30) -> None:
        self.host = host
        self.port = port

    def connect(self, factory) -> defer.Deferred:
        FakeEndpoint.dialled.append((self.host, self.port))
        if self.host in FakeEndpoint.refuse:
            return defer.fail(error.ConnectionRefusedError())
        return defer.succeed(factory.buildProtocol(None))


@pytest.fixture
def fakeEndpoints(monkeypatch):
    FakeEndpoint.dialled = []
    FakeEndpoint.refuse = set()
    monkeypatch.setattr(dial, "TCP4ClientEndpoint", FakeEndpoint)
    monkeypatch.setattr(dial, "TCP6ClientEndpoint", FakeEndpoint)
    return FakeEndpoint


def defaultPolicy(**kwargs) -> DestinationPolicy:
    config = loadConfig(None).proxy
    return DestinationPolicy(config.allow_destinations, config.deny_destinations, **kwargs)


def policy(allow: list[str], deny: list[str]) -> DestinationPolicy:
    return DestinationPolicy(parseHostPatterns(allow), parseHostPatterns(deny))


def makeDialer(policy: DestinationPolicy, resolver: FakeResolver) -> Dialer:
    dialer = Dialer(Clock(), policy, 10.0)
    dialer.resolver = resolver
    return dialer


def result(d: defer.Deferred):
    box: list = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if hasattr(box[0], "raiseException"):
        box[0].raiseException()
    return box[0]


MIXED = [
    "127.0.0.1",
    "198.51.100.7",
    "::1",
    "169.254.169.254",
    "::ffff:127.0.0.1",
    "2001:db8::5",
    "0.0.0.0",
    "fe80::1",
    "64:ff9b::7f00:1",
    "203.0.113.9",
]


def test_addressesKeepsOnlyAllowedOnesInOrder() -> None:
    resolver = FakeResolver(MIXED)
    dialer = makeDialer(defaultPolicy(), resolver)
    assert result(dialer.addresses("mixed.test", 443)) == [
        "198.51.100.7",
        "2001:db8::5",
        "203.0.113.9",
    ]
    assert resolver.calls == ["mixed.test"]


def test_addressesAllDeniedRaisesWithTheLastReason() -> None:
    dialer = makeDialer(defaultPolicy(), FakeResolver(["127.0.0.1", "127.0.0.2", "::1"]))
    with pytest.raises(DestinationDenied) as caught:
        result(dialer.addresses("loopy.test", 80))
    assert "loopy.test (::1)" in caught.value.detail


def test_addressesOfANameThatDoesNotResolve() -> None:
    dialer = makeDialer(defaultPolicy(), FakeResolver([]))
    with pytest.raises(DialError) as caught:
        result(dialer.addresses("nowhere.test", 80))
    assert caught.value.reason == "dns"
    assert caught.value.status == 502


def test_addressesOfALiteralDoNotResolve() -> None:
    resolver = FakeResolver(["198.51.100.7"])
    dialer = makeDialer(defaultPolicy(), resolver)
    assert result(dialer.addresses("198.51.100.8", 80)) == ["198.51.100.8"]
    with pytest.raises(DestinationDenied):
        result(dialer.addresses("0x7f.1", 80))
    assert resolver.calls == []


def test_allowListNameAppliesToEveryAddressUnlessDenied() -> None:
    """allow_destinations = localhost; a name that resolves to several loopback addresses."""
    resolver = FakeResolver(["127.0.0.1", "127.0.0.2", "::1", "169.254.169.254"])
    dialer = makeDialer(policy(["localhost"], ["127.0.0.2", "169.254.0.0/16"]), resolver)
    assert result(dialer.addresses("localhost", 8080)) == ["127.0.0.1", "::1"]
    with pytest.raises(DestinationDenied):
        result(dialer.addresses("127.0.0.1", 8080))  # the address is not the name


def test_allowListNetworkAppliesToResolvedAddresses() -> None:
    resolver = FakeResolver(["10.1.2.3", "10.9.9.9", "192.168.1.1"])
    dialer = makeDialer(policy(["10.1.0.0/16"], []), resolver)
    assert result(dialer.addresses("artifacts.corp.test", 443)) == ["10.1.2.3"]


def test_selfAddressesAreFiltered() -> None:
    base = policy([], []).withSelfAddresses([("127.0.0.1", 3128), ("127.0.0.1", 9530)])
    dialer = makeDialer(base, FakeResolver(["127.0.0.1", "127.0.0.2"]))
    assert result(dialer.addresses("alias.test", 3128)) == ["127.0.0.2"]
    assert result(dialer.addresses("alias.test", 9530)) == ["127.0.0.2"]
    assert result(dialer.addresses("alias.test", 8080)) == ["127.0.0.1", "127.0.0.2"]


def _localNonLoopbackAddress() -> str | None:
    """This host's outward address, found without sending anything (UDP connect)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("198.51.100.1", 9))
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_wildcardListenerIsReachableOnEveryLocalAddress() -> None:
    """
    A listener on all interfaces is this proxy on the host's own non-loopback addresses
    too: with nothing denied, dialling them at the listener's port would loop.
    """
    assert dial._isLocalAddress("127.0.0.1")
    assert not dial._isLocalAddress("198.51.100.7")
    local = _localNonLoopbackAddress()
    if local is None:
        pytest.skip("no non-loopback local address")
    assert dial._isLocalAddress(local)
    wildcard = policy([], []).withSelfAddresses([(None, 3128)])
    dialer = makeDialer(wildcard, FakeResolver([local, "198.51.100.7"]))
    assert result(dialer.addresses("me.test", 3128)) == ["198.51.100.7"]
    assert result(dialer.addresses("me.test", 8080)) == [local, "198.51.100.7"]
    with pytest.raises(DestinationDenied) as caught:
        result(dialer.addresses(local, 3128))
    assert "this proxy itself" in caught.value.detail


def test_connectResolvesOnceAndDialsTheCheckedAddress(fakeEndpoints) -> None:
    """DNS rebinding: a second lookup would say loopback, but there is no second lookup."""
    resolver = FakeResolver(["198.51.100.7"], ["127.0.0.1"])
    dialer = makeDialer(defaultPolicy(), resolver)
    protocol = object()
    assert result(dialer.connect("rebind.test", 80, protocol)) == "198.51.100.7"
    assert resolver.calls == ["rebind.test"]
    assert fakeEndpoints.dialled == [("198.51.100.7", 80)]


def test_connectNeverDialsADeniedAddress(fakeEndpoints) -> None:
    resolver = FakeResolver(MIXED)
    dialer = makeDialer(defaultPolicy(), resolver)
    fakeEndpoints.refuse = {"198.51.100.7"}
    assert result(dialer.connect("mixed.test", 443, object())) == "2001:db8::5"
    assert fakeEndpoints.dialled == [("198.51.100.7", 443), ("2001:db8::5", 443)]


def test_connectToOnlyDeniedAddressesDialsNothing(fakeEndpoints) -> None:
    dialer = makeDialer(defaultPolicy(), FakeResolver(["127.0.0.1", "::1", "169.254.169.254"]))
    with pytest.raises(DestinationDenied):
        result(dialer.connect("metadata.test", 80, object()))
    assert fakeEndpoints.dialled == []


def test_connectWhenEveryAllowedAddressRefuses(fakeEndpoints) -> None:
    dialer = makeDialer(defaultPolicy(), FakeResolver(["198.51.100.7", "203.0.113.9"]))
    fakeEndpoints.refuse = {"198.51.100.7", "203.0.113.9"}
    with pytest.raises(DialError) as caught:
        result(dialer.connect("down.test", 80, object()))
    assert caught.value.reason == "refused"
    assert len(fakeEndpoints.dialled) == 2
