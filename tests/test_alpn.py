"""
Tests for the TLS half of ALPN mirroring ([mitm] http2): per-host server contexts that agree
to h2 or http/1.1 (one leaf per host, metrics counted once per call), the origin client
creator offering a client's list, and alpnOffer. Handshakes run between two ssl.SSLObjects
over memory BIOs in process: no sockets, no reactor.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.tls import (
    H2,
    HTTP11,
    ServerContextCache,
    agreedProtocol,
    alpnOffer,
    clientCreator,
    createCA,
)
from gateway.tls import contexts as contextsModule
from gateway.tls.clienthello import parseClientHello
from gateway.tls.contexts import MAX_MIRRORED, MAX_OFFERS, loadChain
from gateway.tls.mint import mintLeaf, newLeafKey

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def ca():
    return createCA("alpn test CA", now=NOW - timedelta(hours=1))


@pytest.fixture(scope="module")
def caFile(ca, tmp_path_factory):
    path = tmp_path_factory.mktemp("alpn") / "ca.pem"
    path.write_bytes(ca.pem())
    return str(path)


@pytest.fixture(autouse=True)
def _freshClientCache():
    contextsModule._clientCreators.clear()
    contextsModule._clientContexts.clear()


def handshake(client: ssl.SSLObject, cin, cout, server: ssl.SSLObject, sin, sout, hello=None):
    """Run both ends to completion, moving bytes between their BIOs."""
    for _ in range(20):
        done = 0
        for tls in (client, server):
            try:
                tls.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            data = cout.read()
            if data:
                if hello is not None and not hello:
                    hello.append(data)
                sin.write(data)
            data = sout.read()
            if data:
                cin.write(data)
        if done == 2:
            return
    raise AssertionError("handshake did not complete")


def bios():
    return ssl.MemoryBIO(), ssl.MemoryBIO()


def pythonClient(caFile: str, alpn, serverName: str = "api.example.test"):
    ctx = ssl.create_default_context(cafile=caFile)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    cin, cout = bios()
    return ctx.wrap_bio(cin, cout, server_hostname=serverName), cin, cout


def interceptedServer(cache: ServerContextCache, protocol: str):
    sin, sout = bios()
    return cache.serverCreator("connect.example.test", protocol).newTLS(sin, sout), sin, sout


@pytest.mark.parametrize(
    ("offer", "protocol", "agreed"),
    [
        (["h2", "http/1.1"], H2, "h2"),
        (["h2", "http/1.1"], HTTP11, "http/1.1"),
        (["http/1.1"], H2, None),  # the origin chose h2 for another offer: never here
        (["h2"], HTTP11, None),  # an h2-only client of an http/1.1 origin: no ALPN
        (None, H2, None),  # no ALPN from the client: it speaks HTTP/1.1
    ],
)
def test_serverAgreesToTheChosenProtocol(ca, caFile, offer, protocol, agreed):
    """The intercepted client gets the protocol the origin chose, and only if it offered it."""
    cache = ServerContextCache(ca)
    client = pythonClient(caFile, offer)
    server = interceptedServer(cache, protocol)
    handshake(*client, *server)
    assert client[0].selected_alpn_protocol() == agreed
    assert server[0].selected_alpn_protocol() == agreed
    assert client[0].getpeercert()["subjectAltName"] == (("DNS", "api.example.test"),)


def test_noSNIUsesConnectHostWithProtocol(ca, caFile):
    """Without SNI, the CONNECT host's context for the chosen protocol answers."""
    cache = ServerContextCache(ca)
    ctx = ssl.create_default_context(cafile=caFile)
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    cin, cout = bios()
    client = ctx.wrap_bio(cin, cout, server_hostname=None)
    server = interceptedServer(cache, H2)
    handshake(client, cin, cout, *server)
    assert client.selected_alpn_protocol() == "h2"
    assert client.getpeercert()["subjectAltName"] == (("DNS", "connect.example.test"),)


def test_oneLeafPerHostAcrossProtocols(ca):
    """
    A host's h2 and http/1.1 contexts share its leaf: one certificate issued, every other
    call a hit; each protocol's context is cached on its own.
    """
    counts = {"issued": 0, "hit": 0}
    cache = ServerContextCache(
        ca,
        size=2,
        onIssued=lambda: counts.__setitem__("issued", counts["issued"] + 1),
        onHit=lambda: counts.__setitem__("hit", counts["hit"] + 1),
    )
    h1 = cache.contextFor("a.test")
    h2 = cache.contextFor("a.test", H2)
    assert h1 is not h2
    assert counts == {"issued": 1, "hit": 1}
    assert cache.contextFor("A.TEST.", H2) is h2
    assert cache.contextFor("a.test", HTTP11) is h1
    assert counts == {"issued": 1, "hit": 3}
    assert len(cache) == 1  # the LRU counts hosts
    cache.contextFor("b.test", H2)
    cache.contextFor("c.test")  # evicts a.test, both its contexts
    assert len(cache) == 2
    assert cache.contextFor("a.test", H2) is not h2
    assert counts == {"issued": 4, "hit": 3}


def test_remintedLeafDropsOldProtocolContexts(ca):
    """A leaf past its age is re-minted with a new context for each protocol asked."""
    clock = [NOW]
    cache = ServerContextCache(ca, clock=lambda: clock[0])
    h2 = cache.contextFor("old.test", H2)
    clock[0] = NOW + timedelta(days=31)
    assert cache.contextFor("old.test", H2) is not h2


# -- the origin leg ----------------------------------------------------------------------------


def originServer(ca, protocols):
    """An origin's server side for origin.test agreeing to C{protocols} (server order)."""
    key = newLeafKey()
    leaf = mintLeaf(ca, key, "origin.test", NOW)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    loadChain(
        ctx,
        leaf.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    if protocols:
        ctx.set_alpn_protocols(protocols)
    sin, sout = bios()
    return ctx.wrap_bio(sin, sout, server_side=True), sin, sout


@pytest.mark.parametrize(
    ("offer", "origin", "chosen"),
    [
        ((b"h2", b"http/1.1"), ["h2", "http/1.1"], "h2"),
        ((b"h2", b"http/1.1"), ["http/1.1"], "http/1.1"),
        ((b"http/1.1",), ["h2", "http/1.1"], "http/1.1"),
        (None, ["h2", "http/1.1"], "http/1.1"),  # a client without ALPN: offered http/1.1
        ((b"h2", b"http/1.1"), None, None),  # an origin without ALPN: HTTP/1.1
    ],
)
def test_originCreatorOffersTheClientsList(ca, caFile, offer, origin, chosen):
    """The origin sees the client's list, in order, and its choice is readable."""
    cin, cout = bios()
    client = clientCreator("origin.test", caFile, True, alpnOffer(offer)).newTLS(cin, cout)
    server = originServer(ca, origin)
    hello = []
    handshake(client, cin, cout, *server, hello=hello)
    seen = parseClientHello(hello[0])
    assert seen.alpn == (offer or (b"http/1.1",))
    assert seen.serverName == "origin.test"
    assert client.selected_alpn_protocol() == chosen


def test_originCreatorsSharedPerOffer(caFile):
    """Creators and contexts are shared per (host, trust, offer); offers are separate."""
    a = clientCreator("origin.test", caFile, True, (H2, HTTP11))
    assert clientCreator("origin.test", caFile, True, (H2, HTTP11)) is a
    b = clientCreator("origin.test", caFile, True)
    assert b is not a and b.context is not a.context
    assert clientCreator("other.test", caFile, True, (H2, HTTP11)).context is a.context


def test_offersBounded(caFile):
    """Clients choose the offers: past MAX_OFFERS distinct ones, the origin gets http/1.1."""
    for i in range(MAX_OFFERS + 5):
        clientCreator("origin.test", caFile, True, (f"x-{i}", H2))
    assert len(contextsModule._clientContexts) <= MAX_OFFERS + 1
    late = clientCreator("origin.test", caFile, True, ("x-late", H2))
    assert late.context is clientCreator("origin.test", caFile, True).context


@pytest.mark.parametrize(
    ("offered", "mirrored"),
    [
        (None, ("http/1.1",)),
        ((b"h2", b"http/1.1"), ("h2", "http/1.1")),
        ((b"grpc-exp", b"h2"), ("grpc-exp", "h2")),
        ((b"h2", b"h2", b"http/1.1"), ("h2", "http/1.1")),
        ((b"bad name", b"\xff", b"x" * 33), ("http/1.1",)),
        (tuple(b"p%d" % i for i in range(20)), tuple(f"p{i}" for i in range(MAX_MIRRORED))),
    ],
)
def test_alpnOffer(offered, mirrored):
    """The client's list in its order, cleaned and bounded; nothing usable: http/1.1."""
    assert alpnOffer(offered) == mirrored


def test_http2OffMirrorsNothing():
    """[mitm] http2 = off: the origin is offered http/1.1 whatever the client offered."""
    assert alpnOffer((b"h2", b"http/1.1"), http2=False) == ("http/1.1",)
    assert alpnOffer((b"h2",), http2=False) == ("http/1.1",)


@pytest.mark.parametrize(
    ("chosen", "http2", "agreed"),
    [
        (b"h2", True, H2),
        (b"http/1.1", True, HTTP11),
        (None, True, HTTP11),  # an origin without ALPN speaks HTTP/1.1
        (b"h2", False, HTTP11),
        (b"grpc-exp", True, HTTP11),  # a protocol proxygate cannot relay is never agreed
    ],
)
def test_agreedProtocol(chosen, http2, agreed):
    """The client gets h2 only when the origin chose h2 and http2 is on."""
    assert agreedProtocol(chosen, http2) == agreed
