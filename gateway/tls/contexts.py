# -*- test-case-name: tests.test_tls -*-
"""
C{ssl.SSLContext} set-up shared by every TLS leg proxygate runs on
L{gateway.tls.layer.TLSLayer} (the standard library's C{ssl}, not pyOpenSSL: see that
module for why), with nothing but the standard library: a process that never intercepts
never imports C{cryptography}.

Server side (an intercepted client, L{gateway.tls.hostcontexts}; an C{ssl:} listener,
L{gateway.tls.listener}): L{newServerContext} has the settings, which are Twisted's
defaults (TLS >= 1.2, no compression, no renegotiation, server cipher preference) with a
fixed AEAD-only TLS 1.2 cipher list, no session tickets and ALPN http/1.1 only.
C{ssl} loads certificates and keys from files only, so L{loadChain} hands it a PEM through
an anonymous in-memory file (memfd; a private temporary directory where there is none);
nothing is written to disk.

Client side (an intercepted tunnel's origin, an https:// upstream proxy):
L{clientCreator} verifies the peer in OpenSSL (chain against the system trust store or a
bundle, then the DNS name or IP address), with one context per (bundle, verify) shared by
every host.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable

from twisted.logger import Logger

from .groups import applyGroups

__all__ = [
    "HTTP11",
    "CAError",
    "ClientTLS",
    "ServerTLS",
    "clientCreator",
    "loadChain",
    "newServerContext",
]

_log = Logger()


class CAError(Exception):
    """
    The CA files cannot be used.  The message is one line naming the file and
    what is wrong with it (unreadable, not a CA, key does not match the
    certificate, only one of the pair exists, ...).
    """


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


def newServerContext() -> ssl.SSLContext:
    """
    A server context with the shared security settings and ALPN, but no
    certificate yet.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= _SERVER_OPTIONS
    ctx.set_ciphers(MODERN_CIPHERS)
    applyGroups(ctx)
    ctx.num_tickets = 0
    ctx.set_alpn_protocols([HTTP11])
    return ctx


def loadChain(ctx: ssl.SSLContext, pem: bytes, password: Callable[[], bytes] | None = None) -> None:
    """
    Load a PEM holding the leaf, its chain and its key into C{ctx}, which only
    reads files: an anonymous memory file where the platform has one. C{password} is
    asked for an encrypted key (without it OpenSSL would prompt on the terminal).
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("proxygate-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=password)
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="proxygate-") as directory:  # mode 0700
        path = os.path.join(directory, "leaf.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        ctx.load_cert_chain(path, password=password)


class ServerTLS:
    """Makes the server side of TLS on C{context} (an C{ssl:} listener's connections)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context

    def newTLS(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> ssl.SSLObject:
        return self.context.wrap_bio(incoming, outgoing, server_side=True)


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
    applyGroups(ctx)
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
