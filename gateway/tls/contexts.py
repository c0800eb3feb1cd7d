# -*- test-case-name: tests.test_tls -*-
"""
TLS contexts for both legs of an intercepted connection, as C{ssl.SSLContext} objects for
L{gateway.tls.layer.TLSLayer} (the standard library's C{ssl}, not pyOpenSSL: see that
module for why).

Client-facing leg: L{ServerContextCache} keeps an LRU of ready contexts, one per host,
each carrying a leaf minted by L{gateway.tls.mint.mintLeaf} on one shared key.
L{ServerContextCache.serverCreator} gives the creator for the client connection after a
CONNECT: its connections start on a certificate-less base context whose SNI callback
switches them to the context for the name the client asked for (or the CONNECT host when
it sent none). The settings are Twisted's defaults (TLS >= 1.2, no compression, no
renegotiation, server cipher preference) with a fixed AEAD-only TLS 1.2 cipher list, no
session tickets (no resumption: each host has its own context) and ALPN http/1.1 only;
after an SNI switch OpenSSL keeps the base context's protocol limits and ciphers and
consults the new context's ALPN settings, so every context gets the same ones.

C{ssl} loads certificates and keys from files only, so a leaf and the shared key are
handed to it through an anonymous in-memory file (memfd; a private temporary directory
where there is none); nothing is written to disk.

Upstream leg: L{clientCreator} verifies the origin in OpenSSL (chain against the system
trust store or a bundle, then the DNS name or IP address), with one context per (bundle,
verify) shared by every host.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from attrs import frozen
from cryptography.hazmat.primitives import serialization
from twisted.logger import Logger

from gateway.tls.ca import CAError, CertificateAuthority
from gateway.tls.mint import mintLeaf, newLeafKey, normalizeHost

__all__ = ["HTTP11", "ClientTLS", "ServerContextCache", "ServerTLS", "clientCreator"]

_log = Logger()

#: The only application protocol offered or accepted over ALPN: the
#: intercepting handler speaks HTTP/1.1, and agreeing to h2 would break
#: every client that offers it first.
HTTP11 = "http/1.1"

#: TLS 1.2 suites: forward-secret AEAD only (Mozilla "intermediate", minus
#: finite-field DHE, which needs parameters and is slow).  TLS 1.3 suites are
#: OpenSSL's defaults, all of which are modern.
MODERN_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

_SERVER_OPTIONS = (
    ssl.OP_NO_COMPRESSION
    | ssl.OP_CIPHER_SERVER_PREFERENCE
    | ssl.OP_NO_TICKET
    | ssl.OP_SINGLE_ECDH_USE
    | ssl.OP_NO_RENEGOTIATION
)

#: A cached leaf older than this is re-minted on its next use, so a
#: long-running proxy never serves a certificate close to its notAfter.
MAX_LEAF_AGE = timedelta(days=30)


def _utcNow() -> datetime:
    return datetime.now(UTC)


def _noop() -> None:
    pass


def _newServerContext() -> ssl.SSLContext:
    """
    A server context with the shared security settings and ALPN, but no
    certificate yet.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= _SERVER_OPTIONS
    ctx.set_ciphers(MODERN_CIPHERS)
    ctx.num_tickets = 0
    ctx.set_alpn_protocols([HTTP11])
    return ctx


def _loadChain(ctx: ssl.SSLContext, pem: bytes) -> None:
    """
    Load a PEM holding the leaf, its chain and its key into C{ctx}, which only
    reads files: an anonymous memory file where the platform has one.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("proxygate-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="proxygate-") as directory:  # mode 0700
        path = os.path.join(directory, "leaf.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        ctx.load_cert_chain(path)


@frozen
class _Entry:
    """
    A cached per-host context and when its leaf was minted.
    """

    context: ssl.SSLContext
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

    def contextFor(self, host: str) -> ssl.SSLContext:
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

    def _buildContext(self, host: str, now: datetime) -> ssl.SSLContext:
        """
        Mint a leaf for C{host} and build its complete context (certificate,
        CA as chain, shared key), ready before any connection touches it.
        """
        leaf = mintLeaf(self.ca, self._leafKey, host, now)
        ctx = _newServerContext()
        _loadChain(ctx, leaf.public_bytes(serialization.Encoding.PEM) + self._chainAndKey)
        return ctx

    def _serverBaseContext(self) -> ssl.SSLContext:
        """
        The certificate-less context every intercepted connection starts on;
        its SNI callback moves the connection to a per-host context.
        """
        if self._baseContext is None:
            ctx = _newServerContext()
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
            if serverName:
                try:
                    context = self.contextFor(serverName)
                except ValueError:
                    _log.info(
                        "MITM: unusable SNI {serverName!r}; using the CONNECT host",
                        serverName=serverName,
                    )
            if context is None:
                defaultHost = getattr(tls, "proxygateDefaultHost", None)
                if defaultHost is None:
                    return
                context = self.contextFor(defaultHost)
            tls.context = context
        except Exception:
            _log.failure("MITM: cannot select a certificate for a TLS client")

    def serverCreator(self, defaultHost: str) -> ServerTLS:
        """
        The creator of the server side of TLS on the client connection of a
        CONNECT tunnel being intercepted.

        @param defaultHost: The CONNECT host, certified when the client sends
            no SNI (clients never send SNI for IP literals).
        @raise ValueError: If C{defaultHost} is not a valid DNS name or IP
            literal (checked now, not mid-handshake).
        """
        return ServerTLS(self._serverBaseContext(), normalizeHost(defaultHost))


class ServerTLS:
    """
    Makes server connections on the SNI-switching base context, remembering this
    tunnel's CONNECT host (on the C{SSLObject}, where the SNI callback finds it) for the
    no-SNI case.
    """

    def __init__(self, context: ssl.SSLContext, defaultHost: str) -> None:
        self.context = context
        self.defaultHost = defaultHost

    def newTLS(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> ssl.SSLObject:
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)
        tls.proxygateDefaultHost = self.defaultHost
        return tls


# ---------------------------------------------------------------- upstream leg

#: Number of upstream creators kept (one per origin host in practice).
CLIENT_CACHE_SIZE = 256

_clientCreators: OrderedDict[tuple[str, str | None, bool], ClientTLS] = OrderedDict()
_clientContexts: dict[tuple[str | None, bool], ssl.SSLContext] = {}


def _verificationName(hostname: str) -> str:
    """
    The name to verify and send as SNI.  C{ssl} checks IP literals against IP
    SANs and sends no SNI for them, but only when the text is a bare address:
    brackets and an IPv6 zone id must go, and the address is canonicalised.
    DNS names lose a trailing dot, which would otherwise never match a SAN.
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


def _bundleCertificates(caBundle: str) -> str:
    """
    The certificates of the PEM bundle C{caBundle} that OpenSSL can load.

    Each PEM block is tried on its own and blocks OpenSSL cannot parse are
    skipped (with a warning), so that one odd certificate in a system-style
    bundle does not make the whole bundle unusable.

    @raise CAError: If the file cannot be read or holds no usable certificate.
    """
    try:
        with open(caBundle, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CAError(f"{caBundle}: cannot read the CA bundle: {e.strerror or e}") from None
    usable = []
    skipped = 0
    for block in _PEM_CERTIFICATE.findall(data):
        text = block.decode("ascii", "replace")
        try:
            ssl.create_default_context(cadata=text)
        except (ssl.SSLError, ValueError):
            skipped += 1
        else:
            usable.append(text)
    if not usable:
        raise CAError(f"{caBundle}: no PEM certificates in the CA bundle")
    if skipped:
        _log.warn(
            "CA bundle {caBundle}: skipped {skipped} unparsable certificate(s)",
            caBundle=caBundle,
            skipped=skipped,
        )
    return "\n".join(usable)


def _clientContext(caBundle: str | None, verify: bool) -> ssl.SSLContext:
    """
    The client context for one trust setting, shared by every origin (the name to
    verify is per connection); built once because loading a trust store is slow.
    """
    key = (caBundle, verify)
    ctx = _clientContexts.get(key)
    if ctx is not None:
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([HTTP11])
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif caBundle is None:
        ctx.load_default_certs()
    else:
        ctx.load_verify_locations(cadata=_bundleCertificates(caBundle))
    _clientContexts[key] = ctx
    return ctx


class ClientTLS:
    """
    Makes client connections to one origin: SNI and verification for C{serverName}
    (a DNS name, or an IP literal: verified against IP SANs, no SNI).
    """

    def __init__(self, context: ssl.SSLContext, serverName: str) -> None:
        self.context = context
        self.serverName = serverName

    def newTLS(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> ssl.SSLObject:
        return self.context.wrap_bio(incoming, outgoing, server_hostname=self.serverName)


def clientCreator(hostname: str, caBundle: str | None, verify: bool) -> ClientTLS:
    """
    The TLS creator for the upstream leg to an origin (or to an https:// proxy), for
    L{gateway.tls.layer.wrapEndpoint} or a L{gateway.tls.layer.TLSLayer}.

    @param hostname: The origin host as the client named it: DNS name or IP
        literal (brackets allowed).  DNS names are verified against DNS SANs
        and sent as SNI; IP literals against IP SANs, without SNI.
    @param caBundle: A PEM file of trusted CAs (may hold many); L{None} for
        the system trust store (OpenSSL default paths; C{SSL_CERT_FILE} and
        C{SSL_CERT_DIR} override them).
    @param verify: L{False} disables every check (chain and name): the
        upstream connection is then open to interception; use it only for
        testing against origins with broken certificates.  SNI is still sent.
    @return: A creator offering ALPN http/1.1 only; shared between calls
        with the same arguments.
    @raise CAError: If C{caBundle} cannot be read or holds no certificate.
    """
    name = _verificationName(hostname)
    key = (name, caBundle, verify)
    creator = _clientCreators.get(key)
    if creator is not None:
        _clientCreators.move_to_end(key)
        return creator
    creator = ClientTLS(_clientContext(caBundle, verify), name)
    _clientCreators[key] = creator
    while len(_clientCreators) > CLIENT_CACHE_SIZE:
        _clientCreators.popitem(last=False)
    return creator
