# -*- test-case-name: tests.test_tls -*-
"""
TLS contexts for both legs of an intercepted connection.

Client-facing leg: L{ServerContextCache} keeps an LRU of ready
C{OpenSSL.SSL.Context} objects, one per host, each carrying a leaf minted by
L{gateway.tls.mint.mintLeaf} on one shared key.  L{ServerContextCache.serverCreator}
gives the creator to pass to C{transport.startTLS} after a CONNECT: its
connections start on a certificate-less base context whose SNI callback
switches them to the context for the name the client asked for (or the
CONNECT host when it sent none).

Why contexts are built by hand rather than with C{CertificateOptions}: since
pyOpenSSL 26.2 a context cannot be changed once a connection used it, so each
must be complete before first use; and C{CertificateOptions.__init__} expands
the cipher string with a throw-away context, which would double the cost of a
new host.  The settings mirror Twisted's defaults (TLS >= 1.2, no
compression, no renegotiation, server cipher preference) with a fixed AEAD-only
cipher list, and every context, base and per-host, gets the same ALPN select
callback: after an SNI switch OpenSSL consults the I{new} context's callback,
while protocol limits and ciphers stay those of the base context.

Upstream leg: L{clientCreator} wraps Twisted's C{optionsForClientTLS}
(service-identity hostname/IP checks against system trust or a bundle), cached
per (hostname, bundle, verify) because building a trust store is slow.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from attrs import frozen
from OpenSSL import SSL
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from zope.interface import implementer

from gateway.tls.ca import CAError, CertificateAuthority
from gateway.tls.mint import mintLeaf, newLeafKey, normalizeHost

if TYPE_CHECKING:
    # Not exported by twisted.internet.ssl; only needed for annotations.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = ["HTTP11", "ServerContextCache", "clientCreator"]

_log = Logger()

#: The only application protocol offered or accepted over ALPN: the
#: intercepting handler speaks HTTP/1.1, and agreeing to h2 would break
#: every client that offers it first.
HTTP11 = b"http/1.1"

#: TLS 1.2 suites: forward-secret AEAD only (Mozilla "intermediate", minus
#: finite-field DHE, which needs parameters and is slow).  TLS 1.3 suites are
#: OpenSSL's defaults, all of which are modern.
MODERN_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

_SERVER_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_NO_TICKET
    | SSL.OP_SINGLE_ECDH_USE
    | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
)

#: A cached leaf older than this is re-minted on its next use, so a
#: long-running proxy never serves a certificate close to its notAfter.
MAX_LEAF_AGE = timedelta(days=30)


def _utcNow() -> datetime:
    return datetime.now(UTC)


def _noop() -> None:
    pass


def _selectALPN(connection: SSL.Connection, offered: list[bytes]) -> object:
    """
    ALPN select callback: http/1.1 when offered; otherwise no ALPN at all
    (the handshake goes on and the client falls back to its default, which
    for HTTPS is HTTP/1.1).  Never h2.
    """
    if HTTP11 in offered:
        return HTTP11
    return SSL.NO_OVERLAPPING_PROTOCOLS


def _newServerContext() -> SSL.Context:
    """
    A server context with the shared security settings and ALPN, but no
    certificate yet.
    """
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_SERVER_OPTIONS)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_cipher_list(MODERN_CIPHERS)
    ctx.set_alpn_select_callback(_selectALPN)
    return ctx


@frozen
class _Entry:
    """
    A cached per-host context and when its leaf was minted.
    """

    context: SSL.Context
    issuedAt: datetime


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
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._baseContext: SSL.Context | None = None
        self._defaultHosts: WeakKeyDictionary[SSL.Connection, str] = WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._entries)

    def contextFor(self, host: str) -> SSL.Context:
        """
        The ready server context for C{host}, minting its leaf on a miss or
        when the cached one is older than L{MAX_LEAF_AGE}.

        @param host: A DNS name or IP literal (case, a trailing dot and IPv6
            brackets do not matter).
        @raise ValueError: If C{host} is not a valid DNS name or IP literal.
        """
        key = normalizeHost(host)
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and now - entry.issuedAt < MAX_LEAF_AGE:
            self._entries.move_to_end(key)
            self._onHit()
            return entry.context
        context = self._buildContext(key, now)
        self._entries[key] = _Entry(context=context, issuedAt=now)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        self._onIssued()
        return context

    def _buildContext(self, host: str, now: datetime) -> SSL.Context:
        """
        Mint a leaf for C{host} and build its complete context (certificate,
        shared key, CA as chain), ready before any connection touches it.
        """
        leaf = mintLeaf(self.ca, self._leafKey, host, now)
        ctx = _newServerContext()
        ctx.use_certificate(leaf)
        ctx.use_privatekey(self._leafKey)
        ctx.add_extra_chain_cert(self.ca.cert)
        ctx.check_privatekey()
        return ctx

    def _serverBaseContext(self) -> SSL.Context:
        """
        The certificate-less context every intercepted connection starts on;
        its SNI callback moves the connection to a per-host context.  Built
        once: it is shared, the per-connection fallback host lives in
        C{_defaultHosts}.
        """
        if self._baseContext is None:
            ctx = _newServerContext()
            ctx.set_tlsext_servername_callback(self._onServerName)
            self._baseContext = ctx
        return self._baseContext

    def _onServerName(self, connection: SSL.Connection) -> None:
        """
        SNI callback.  OpenSSL (1.1.1 and later) calls it for every
        ClientHello, with or without a server name, so a client that sends
        none still gets switched, to the CONNECT host's context.  A name we
        cannot certify (not ASCII, not a valid DNS name) also falls back to
        the CONNECT host.  Any failure is logged and leaves the connection on
        the certificate-less base context, which fails the handshake cleanly
        instead of raising into OpenSSL.
        """
        try:
            context = None
            serverName = connection.get_servername()
            if serverName:
                try:
                    context = self.contextFor(serverName.decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    _log.info(
                        "MITM: unusable SNI {serverName!r}; using the CONNECT host",
                        serverName=serverName,
                    )
            if context is None:
                defaultHost = self._defaultHosts.get(connection)
                if defaultHost is None:
                    return
                context = self.contextFor(defaultHost)
            connection.set_context(context)
        except Exception:
            _log.failure("MITM: cannot select a certificate for a TLS client")

    def serverCreator(self, defaultHost: str) -> IOpenSSLServerConnectionCreator:
        """
        A connection creator for C{transport.startTLS(creator)} on the
        client-facing transport of a CONNECT tunnel being intercepted.

        @param defaultHost: The CONNECT host, certified when the client sends
            no SNI (clients never send SNI for IP literals).
        @raise ValueError: If C{defaultHost} is not a valid DNS name or IP
            literal (checked now, not mid-handshake).
        """
        return _MITMServerCreator(self, normalizeHost(defaultHost))


@implementer(IOpenSSLServerConnectionCreator)
class _MITMServerCreator:
    """
    Creates server connections on the cache's SNI-switching base context,
    remembering this tunnel's CONNECT host for the no-SNI case.
    """

    def __init__(self, cache: ServerContextCache, defaultHost: str) -> None:
        self._cache = cache
        self._defaultHost = defaultHost

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._cache._serverBaseContext(), None)
        self._cache._defaultHosts[connection] = self._defaultHost
        return connection


# ---------------------------------------------------------------- upstream leg

#: Number of upstream creators kept (one per origin host in practice).
CLIENT_CACHE_SIZE = 256

_clientCreators: OrderedDict[tuple[str, str | None, bool], IOpenSSLClientConnectionCreator] = (
    OrderedDict()
)
_trustRoots: dict[str, IOpenSSLTrustRoot] = {}


def _verificationName(hostname: str) -> str:
    """
    The name to hand to C{optionsForClientTLS}.  Twisted checks IP literals
    against IP SANs (service_identity C{IPAddress_ID}) and sends no SNI for
    them, but only when the text is a bare address: brackets and an IPv6
    zone id must go, and the address is canonicalised.  DNS names lose a
    trailing dot, which would otherwise never match a SAN.
    """
    text = hostname.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0] if ":" in text else text))
    except ValueError:
        return text.rstrip(".").lower()


_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def _bundleTrustRoot(caBundle: str) -> IOpenSSLTrustRoot:
    """
    A trust root holding every certificate in the PEM bundle C{caBundle}
    (read once per path and kept: parsing a large bundle is slow).

    Each PEM block is loaded on its own and blocks OpenSSL cannot parse are
    skipped (with a warning), so that one odd certificate in a system-style
    bundle does not make the whole bundle unusable.

    @raise CAError: If the file cannot be read or holds no usable certificate.
    """
    root = _trustRoots.get(caBundle)
    if root is not None:
        return root
    try:
        with open(caBundle, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CAError(f"{caBundle}: cannot read the CA bundle: {e.strerror or e}") from None
    certificates = []
    skipped = 0
    for block in _PEM_CERTIFICATE.findall(data):
        try:
            certificates.append(Certificate.loadPEM(block))
        except Exception:
            skipped += 1
    if not certificates:
        raise CAError(f"{caBundle}: no PEM certificates in the CA bundle")
    if skipped:
        _log.warn(
            "CA bundle {caBundle}: skipped {skipped} unparsable certificate(s)",
            caBundle=caBundle,
            skipped=skipped,
        )
    root = trustRootFromCertificates(certificates)
    _trustRoots[caBundle] = root
    return root


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientCreator:
    """
    DANGEROUS: a client creator that accepts any certificate from any
    issuer for any name, i.e. no protection against a man in the middle.
    Only for C{verify_upstream = off}.  It still sends SNI, so the origin
    picks the right certificate and virtual host, and offers http/1.1 only.
    """

    def __init__(self, hostname: str) -> None:
        self._options = CertificateOptions(acceptableProtocols=[HTTP11])
        try:
            ipaddress.ip_address(hostname)
            self._serverName: bytes | None = None
        except ValueError:
            try:
                self._serverName = hostname.encode("idna")
            except UnicodeError:
                self._serverName = None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._serverName:
            connection.set_tlsext_host_name(self._serverName)
        return connection


def clientCreator(
    hostname: str, caBundle: str | None, verify: bool
) -> IOpenSSLClientConnectionCreator:
    """
    The TLS connection creator for the upstream leg to an origin, for
    C{wrapClientTLS(creator, endpoint)} or C{transport.startTLS(creator)}.

    @param hostname: The origin host as the client named it: DNS name or IP
        literal (brackets allowed).  DNS names are verified against DNS SANs
        and sent as SNI; IP literals against IP SANs, without SNI.
    @param caBundle: A PEM file of trusted CAs (may hold many); L{None} for
        the system trust store (OpenSSL default paths; set C{SSL_CERT_FILE}
        where there is none).
    @param verify: L{False} disables every check (chain and name): the
        upstream connection is then open to interception; use it only for
        testing against origins with broken certificates.
    @return: A creator offering ALPN http/1.1 only; shared between calls
        with the same arguments (the trust store is built once per entry).
    @raise CAError: If C{caBundle} cannot be read or holds no certificate.
    """
    name = _verificationName(hostname)
    key = (name, caBundle, verify)
    creator = _clientCreators.get(key)
    if creator is not None:
        _clientCreators.move_to_end(key)
        return creator
    if not verify:
        creator = _UnverifiedClientCreator(name)
    else:
        trustRoot = platformTrust() if caBundle is None else _bundleTrustRoot(caBundle)
        creator = optionsForClientTLS(name, trustRoot=trustRoot, acceptableProtocols=[HTTP11])
    _clientCreators[key] = creator
    while len(_clientCreators) > CLIENT_CACHE_SIZE:
        _clientCreators.popitem(last=False)
    return creator
