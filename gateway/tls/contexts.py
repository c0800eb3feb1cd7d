# -*- test-case-name: tests.test_tls -*-
"""
C{ssl.SSLContext} set-up shared by every TLS leg proxygate runs on
L{gateway.tls.layer.TLSLayer} (the standard library's C{ssl}, not pyOpenSSL: see that
module for why), with nothing but the standard library: a process that never intercepts
never imports C{cryptography}.

Server side (an intercepted client, L{gateway.tls.hostcontexts}; an C{ssl:} listener,
L{gateway.tls.listener}): L{newServerContext} has the settings, which are Twisted's
defaults (TLS >= 1.2, no compression, no renegotiation, server cipher preference) with a
fixed AEAD-only TLS 1.2 cipher list, no session tickets, and one ALPN protocol: http/1.1,
or h2 for an intercepted client whose origin chose h2 (L{gateway.tls.hostcontexts}).
C{ssl} loads certificates and keys from files only, so L{loadChain} hands it a PEM through
an anonymous in-memory file (memfd; a private temporary directory where there is none);
nothing is written to disk.

Client side (an intercepted tunnel's origin, an https:// upstream proxy):
L{clientCreator} verifies the peer in OpenSSL (chain against the system trust store or a
bundle, then the DNS name or IP address), with one context per (bundle, verify, ALPN offer)
shared by every host. The ALPN offer is http/1.1, or the intercepted client's own list
(C{[mitm] http2}: mirrored), and the TLS layer's C{negotiatedProtocol} tells what the
origin chose.
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
    "H2",
    "HTTP11",
    "CAError",
    "ClientTLS",
    "ServerTLS",
    "agreedProtocol",
    "alpnOffer",
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


#: The application protocol offered or accepted over ALPN unless both legs of an
#: intercepted tunnel agree on h2: agreeing to a protocol the proxy cannot relay would
#: break every client that offers it first.
HTTP11 = "http/1.1"

#: HTTP/2 over TLS (RFC 9113 §3.2).
H2 = "h2"

#: The most protocols mirrored from a client's offer to its origin, and the longest name:
#: real offers are 1-3 short names; the rest of a long list is dropped, not relayed.
MAX_MIRRORED = 8
MAX_PROTOCOL_NAME = 32

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


def newServerContext(protocol: str | tuple[str, ...] = HTTP11) -> ssl.SSLContext:
    """
    A server context with the shared security settings and ALPN, but no
    certificate yet.

    @param protocol: the one ALPN protocol agreed to (C{HTTP11} or C{H2}); a client that
        does not offer it gets no ALPN answer (and speaks HTTP/1.1, RFC 7301 §3.2 lets it).
        Or several, in the server's order of preference (C{(H2, HTTP11)}: the inbound
        gateway's ssl: listeners with C{[reverse] http2 = on}).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= _SERVER_OPTIONS
    ctx.set_ciphers(MODERN_CIPHERS)
    applyGroups(ctx)
    ctx.num_tickets = 0
    ctx.set_alpn_protocols([protocol] if isinstance(protocol, str) else list(protocol))
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

_clientCreators: OrderedDict[tuple[str, str | None, bool, tuple[str, ...]], ClientTLS] = (
    OrderedDict()
)
_clientContexts: dict[tuple[str | None, bool, tuple[str, ...]], ssl.SSLContext] = {}

#: Distinct ALPN offers given client contexts; beyond it the offer is cut to http/1.1
#: (each offer is a context with its own trust store: bounded, whatever clients send).
MAX_OFFERS = 16


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


def alpnOffer(offered: tuple[bytes, ...] | None, http2: bool = True) -> tuple[str, ...]:
    """
    The ALPN list to offer an origin on behalf of a client that offered C{offered} (from
    L{gateway.tls.clienthello}; None: no ALPN extension): the client's list in its order,
    names that are not printable ASCII or too long dropped, at most L{MAX_MIRRORED}; a
    client that offered nothing usable is offered http/1.1 (what it will speak). With
    C{http2} off (C{[mitm] http2 = off}): http/1.1, whatever the client offered.
    """
    if not offered or not http2:
        return (HTTP11,)
    names = []
    for name in offered:
        if len(name) <= MAX_PROTOCOL_NAME and all(0x21 <= b <= 0x7E for b in name):
            text = name.decode("ascii")
            if text not in names:
                names.append(text)
        if len(names) == MAX_MIRRORED:
            break
    return tuple(names) or (HTTP11,)


def agreedProtocol(chosen: bytes | None, http2: bool = True) -> str:
    """
    The one ALPN protocol the intercepted client's handshake may agree to, given what the
    origin chose (the TLS layer's C{negotiatedProtocol}) for the mirrored offer: h2 only
    when the origin chose h2 (and C{[mitm] http2} is on), else http/1.1 (a client that did
    not offer it gets no ALPN answer, and speaks HTTP/1.1 or gives up).
    """
    return H2 if http2 and chosen == b"h2" else HTTP11


def _clientContext(caBundle: str | None, verify: bool, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """
    The client context for one trust setting and ALPN offer, shared by every origin (the
    name to verify is per connection); built once because loading a trust store is slow.
    """
    key = (caBundle, verify, alpn)
    ctx = _clientContexts.get(key)
    if ctx is not None:
        return ctx
    if alpn != (HTTP11,) and sum(1 for k in _clientContexts if k[:2] == key[:2]) >= MAX_OFFERS:
        return _clientContext(caBundle, verify, (HTTP11,))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    applyGroups(ctx)
    ctx.set_alpn_protocols(list(alpn))
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


def clientCreator(
    hostname: str,
    caBundle: str | None,
    verify: bool,
    alpn: tuple[str, ...] = (HTTP11,),
) -> ClientTLS:
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
    @param alpn: The ALPN protocols to offer, in order (L{alpnOffer} makes a client's
        offer into one); the default offers http/1.1 only.
    @return: A creator; shared between calls with the same arguments.
    @raise CAError: If C{caBundle} cannot be read or holds no certificate.
    """
    name = _verificationName(hostname)
    key = (name, caBundle, verify, alpn)
    creator = _clientCreators.get(key)
    if creator is not None:
        _clientCreators.move_to_end(key)
        return creator
    creator = ClientTLS(_clientContext(caBundle, verify, alpn), name)
    _clientCreators[key] = creator
    while len(_clientCreators) > CLIENT_CACHE_SIZE:
        _clientCreators.popitem(last=False)
    return creator
