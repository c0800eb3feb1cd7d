# -*- test-case-name: tests.test_tls -*-
"""
The client-facing leg of an intercepted tunnel: one ready server context per host and ALPN
protocol (http/1.1, or h2 when the origin chose it: C{[mitm] http2}), each carrying the
host's leaf minted by L{gateway.tls.mint.mintLeaf} on one shared key, kept in an LRU by host
(a host's h2 and http/1.1 contexts share one leaf: one certificate issued, the other a hit).

L{ServerContextCache.serverCreator} gives the creator for the client connection after a
CONNECT: its connections start on a certificate-less base context whose SNI callback
switches them to the context for the name the client asked for (or the CONNECT host when
it sent none). After an SNI switch OpenSSL keeps the base context's protocol limits and
ciphers and consults the new context's ALPN settings, so every context is made by
L{gateway.tls.contexts.newServerContext}. No session tickets: each host has its own
context, so there is no resumption across them.
"""

from __future__ import annotations

import ssl
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from attrs import frozen
from cryptography.hazmat.primitives import serialization
from twisted.logger import Logger

from gateway.tls.ca import CertificateAuthority
from gateway.tls.contexts import HTTP11, ServerTLS, loadChain, newServerContext
from gateway.tls.mint import mintLeaf, newLeafKey, normalizeHost

__all__ = ["MAX_LEAF_AGE", "InterceptTLS", "ServerContextCache"]

_log = Logger()

#: A cached leaf older than this is re-minted on its next use, so a
#: long-running proxy never serves a certificate close to its notAfter.
MAX_LEAF_AGE = timedelta(days=30)


def _utcNow() -> datetime:
    return datetime.now(UTC)


def _noop() -> None:
    pass


@frozen
class _Entry:
    """
    A host's leaf (with its chain and key, as PEM), when it was minted, and the contexts
    built on it so far, by ALPN protocol (at most two: http/1.1 and h2).
    """

    pem: bytes
    issuedAt: datetime
    contexts: dict[str, ssl.SSLContext]


class ServerContextCache:
    """
    Per-host server contexts for TLS interception, minted on demand and kept
    in an LRU.

    Single-threaded by design: use it from the reactor thread only.

    @ivar ca: The signing CA.
    @ivar size: The most contexts kept.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        size: int = 1024,
        clock: Callable[[], datetime] = _utcNow,
        onIssued: Callable[[], None] = _noop,
        onHit: Callable[[], None] = _noop,
    ) -> None:
        """
        @param ca: The CA that signs every leaf; its certificate is sent as
            the chain so clients that trust it need nothing else.
        @param size: The most per-host contexts kept (least recently used
            ones are dropped beyond it).  Must be at least 1.
        @param clock: Returns the current time (timezone-aware) for minting
            and ageing; injectable for tests.
        @param onIssued: Called once for every leaf minted (for
            C{proxygate_mitm_certificates_issued_total}).
        @param onHit: Called once for every request served from the cache
            (for C{proxygate_mitm_certificate_cache_hits_total}).
        """
        if size < 1:
            raise ValueError("ServerContextCache size must be at least 1")
        self.ca = ca
        self.size = size
        self._clock = clock
        self._onIssued = onIssued
        self._onHit = onHit
        self._leafKey = newLeafKey()
        # The chain and key part of every leaf's PEM, serialised once.
        self._chainAndKey = ca.pem() + self._leafKey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._baseContext: ssl.SSLContext | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def contextFor(self, host: str, protocol: str = HTTP11) -> ssl.SSLContext:
        """
        The ready server context for C{host} agreeing to ALPN C{protocol}, minting the
        host's leaf on a miss or when the cached one is older than L{MAX_LEAF_AGE}. Every
        call counts once: a certificate issued, or a cache hit (a host's first context for
        another protocol reuses its leaf: a hit).

        @param host: A DNS name or IP literal (case, a trailing dot and IPv6
            brackets do not matter).
        @param protocol: C{HTTP11} or C{H2} (L{gateway.tls.contexts}).
        @raise ValueError: If C{host} is not a valid DNS name or IP literal, or one the
            CA's name constraints do not permit (no such leaf is ever minted: clients
            would reject it, and it would be a certificate for a name the CA must not sign).
        """
        key = normalizeHost(host)
        if key not in self._entries and not self.ca.permits(key):
            raise ValueError(f"{host!r} is outside the CA's name constraints")
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and now - entry.issuedAt < MAX_LEAF_AGE:
            self._entries.move_to_end(key)
            self._onHit()
            context = entry.contexts.get(protocol)
            if context is None:
                context = entry.contexts[protocol] = self._buildContext(entry.pem, protocol)
            return context
        leaf = mintLeaf(self.ca, self._leafKey, key, now)
        pem = leaf.public_bytes(serialization.Encoding.PEM) + self._chainAndKey
        context = self._buildContext(pem, protocol)
        self._entries[key] = _Entry(pem=pem, issuedAt=now, contexts={protocol: context})
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        self._onIssued()
        return context

    @staticmethod
    def _buildContext(pem: bytes, protocol: str) -> ssl.SSLContext:
        """
        A complete context (leaf, CA as chain, shared key; ALPN C{protocol}), ready
        before any connection touches it.
        """
        ctx = newServerContext(protocol)
        loadChain(ctx, pem)
        return ctx

    def _serverBaseContext(self) -> ssl.SSLContext:
        """
        The certificate-less context every intercepted connection starts on;
        its SNI callback moves the connection to a per-host context.
        """
        if self._baseContext is None:
            ctx = newServerContext()
            ctx.sni_callback = self._onServerName
            self._baseContext = ctx
        return self._baseContext

    def _onServerName(self, tls: ssl.SSLObject, serverName: str | None, _ctx) -> None:
        """
        SNI callback.  OpenSSL (1.1.1 and later) calls it for every
        ClientHello, with or without a server name, so a client that sends
        none still gets switched, to the CONNECT host's context.  A name we
        cannot certify (not a valid DNS name) also falls back to the CONNECT
        host.  Any failure is logged and leaves the connection on the
        certificate-less base context, which fails the handshake cleanly
        instead of raising into OpenSSL.
        """
        try:
            context = None
            protocol = getattr(tls, "proxygateProtocol", HTTP11)
            if serverName:
                try:
                    context = self.contextFor(serverName, protocol)
                except ValueError:
                    _log.info(
                        "MITM: unusable SNI {serverName!r}; using the CONNECT host",
                        serverName=serverName,
                    )
            if context is None:
                defaultHost = getattr(tls, "proxygateDefaultHost", None)
                if defaultHost is None:
                    return
                try:
                    context = self.contextFor(defaultHost, protocol)
                except ValueError as e:
                    # Outside the name constraints: no certificate, the handshake fails.
                    _log.info("MITM: no certificate for a TLS client: {why}", why=str(e))
                    return
            tls.context = context
        except Exception:
            _log.failure("MITM: cannot select a certificate for a TLS client")

    def serverCreator(self, defaultHost: str, protocol: str = HTTP11) -> InterceptTLS:
        """
        The creator of the server side of TLS on the client connection of a
        CONNECT tunnel being intercepted.

        @param defaultHost: The CONNECT host, certified when the client sends
            no SNI (clients never send SNI for IP literals).
        @param protocol: The ALPN protocol to agree to if the client offers it: C{H2}
            when the origin chose h2 for this client's offer, else C{HTTP11}.
        @raise ValueError: If C{defaultHost} is not a valid DNS name or IP
            literal (checked now, not mid-handshake).
        """
        return InterceptTLS(self._serverBaseContext(), normalizeHost(defaultHost), protocol)


class InterceptTLS(ServerTLS):
    """
    Makes server connections on the SNI-switching base context, remembering this
    tunnel's CONNECT host (for the no-SNI case) and ALPN protocol on the C{SSLObject},
    where the SNI callback finds them.
    """

    def __init__(self, context: ssl.SSLContext, defaultHost: str, protocol: str = HTTP11):
        super().__init__(context)
        self.defaultHost = defaultHost
        self.protocol = protocol

    def newTLS(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> ssl.SSLObject:
        tls = super().newTLS(incoming, outgoing)
        tls.proxygateDefaultHost = self.defaultHost
        tls.proxygateProtocol = self.protocol
        return tls
