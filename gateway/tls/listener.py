# -*- test-case-name: tests.test_https_listener -*-
"""
The C{ssl:} listener (an HTTPS proxy: TLS between the client and proxygate) on the standard
library's C{ssl}, through L{gateway.tls.layer.TLSLayer}.

Why not Twisted's C{ssl:} endpoint: it needs pyOpenSSL, and C{twisted.internet} imports
pyOpenSSL (with the second OpenSSL that C{cryptography} carries) in every process where it
is installed, whether or not anything uses it: about 13 MB of memory per process. With the
listener here, proxygate's TLS is the standard library's everywhere (this listener, the
intercepted tunnel's two legs, an https:// upstream), and pyOpenSSL is not a dependency.

The string is Twisted's: C{ssl:PORT[:interface=ADDRESS][:backlog=N][:privateKey=FILE]
[:certKey=FILE][:extraCertChain=FILE]}, with Twisted's defaults (C{privateKey=server.pem},
C{certKey} the same file as C{privateKey}). Every certificate in C{certKey} and
C{extraCertChain} is sent as the chain. C{sslmethod} and C{dhParameters} are refused with
a message rather than ignored: the listener speaks TLS 1.2 and 1.3 with forward-secret
AEAD suites (L{gateway.tls.contexts.newServerContext}), which need neither. The files are
read once, when the configuration is loaded, so a bad pair stops start-up with one line.
"""

from __future__ import annotations

import ssl

from twisted.internet import defer
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from .contexts import HTTP11, ServerTLS, loadChain, newServerContext
from .layer import TLSFactory, sslReason

__all__ = ["SSLServerEndpoint", "sslServerEndpoint"]

_REFUSED = {
    "sslmethod": "the listener offers TLS 1.2 and 1.3 only",
    "dhParameters": "the listener offers no finite-field DHE suites",
}
_KNOWN = {"port", "interface", "backlog", "privateKey", "certKey", "extraCertChain"}


@implementer(IStreamServerEndpoint)
class SSLServerEndpoint:
    """Listens on TCP (C{reactor.listenTCP}) and speaks TLS on every accepted connection."""

    def __init__(
        self, reactor, port: int, context: ssl.SSLContext, backlog: int = 50, interface: str = ""
    ) -> None:
        self._reactor = reactor
        self._port = port
        self._creator = ServerTLS(context)
        self._backlog = backlog
        self._interface = interface

    def listen(self, protocolFactory):
        return defer.execute(
            self._reactor.listenTCP,
            self._port,
            TLSFactory(protocolFactory, self._creator),
            self._backlog,
            self._interface,
        )


def sslServerEndpoint(
    reactor, args: list[str], kwargs: dict[str, str], alpn: tuple[str, ...] = ()
) -> SSLServerEndpoint:
    """
    The endpoint for the fields of an C{ssl:} string (split by
    L{gateway.config.endpointParts}), agreeing to the ALPN protocols C{alpn} (in the
    server's order of preference; the protocol reads C{negotiatedProtocol}), by default
    http/1.1 only.

    @raise ValueError: with one line saying what is wrong (an option, a port, a file).
    """
    for name, why in _REFUSED.items():
        if name in kwargs:
            raise ValueError(f"{name}= is not supported ({why})")
    unknown = sorted(set(kwargs) - _KNOWN)
    if unknown:
        raise ValueError(f"unknown option {unknown[0]}=")
    port = kwargs.get("port", args[0] if args else None)
    if port is None or not port.isdigit():
        raise ValueError(f"the port must be a number, not {port!r}")
    backlog = kwargs.get("backlog", "50")
    if not backlog.isdigit():
        raise ValueError(f"backlog must be a number, not {backlog!r}")
    privateKey = kwargs.get("privateKey", "server.pem")
    certKey = kwargs.get("certKey", privateKey)
    files = [certKey]
    if "extraCertChain" in kwargs:
        files.append(kwargs["extraCertChain"])
    files.append(privateKey)
    context = serverContext(*files, alpn=alpn or (HTTP11,))
    return SSLServerEndpoint(reactor, int(port), context, int(backlog), kwargs.get("interface", ""))


def serverContext(*paths: str, alpn: tuple[str, ...] = (HTTP11,)) -> ssl.SSLContext:
    """
    A server context with the certificates and the key of the PEM files C{paths}
    (certificate first, then any chain, then the key), checked now.

    @raise ValueError: if a file cannot be read, or OpenSSL cannot use what is in them (no
        certificate, no key, a key that does not match, an encrypted key).
    """
    pem = {}
    for path in paths:  # certKey is privateKey unless said otherwise: read it once
        try:
            with open(path, "rb") as f:
                pem[path] = f.read()
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem[paths[0]]:
        raise ValueError(f"no PEM certificate in {paths[0]}")
    if b"PRIVATE KEY-----" not in pem[paths[-1]]:
        raise ValueError(f"no PEM private key in {paths[-1]}")
    context = newServerContext(alpn)
    try:
        loadChain(context, b"\n".join(pem.values()), password=_encrypted)
    except _EncryptedKey:
        raise ValueError(
            f"the private key in {paths[-1]} is encrypted (a service cannot type its "
            "passphrase: decrypt it, e.g. openssl pkey -in KEY -out KEY.plain)"
        ) from None
    except ssl.SSLError as e:
        named = " and ".join(pem)
        raise ValueError(f"cannot use the certificate and key in {named}: {sslReason(e)}") from None
    return context


class _EncryptedKey(Exception):
    pass


def _encrypted() -> bytes:
    """Asked for a passphrase: the key is encrypted (OpenSSL would prompt on the terminal)."""
    raise _EncryptedKey()
