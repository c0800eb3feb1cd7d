# -*- test-case-name: tests.test_tls -*-
"""
TLS for proxygate: the interception CA, per-host leaf certificates, the
C{ssl} contexts for both legs of an intercepted tunnel and for C{ssl:}
listeners, and the TLS layer that runs them on Twisted transports.

The submodules are split by concern, and by what they import: C{layer} (TLS over
memory BIOs between a transport and a protocol), C{contexts} (C{ssl.SSLContext}
set-up) and C{listener} (C{ssl:} listeners) need only the standard library;
C{ca} (files and the CA), C{mint} (pure certificate minting) and
C{hostcontexts} (per-host contexts of an intercepted tunnel) need
C{cryptography}, which a proxy that never intercepts does not load (about
7 MB of memory per process). The names below are importable from here, each
loading its submodule when first asked for.
"""

from importlib import import_module

_EXPORTS = {
    "H2": "contexts",
    "HTTP11": "contexts",
    "agreedProtocol": "contexts",
    "alpnOffer": "contexts",
    "ClientHello": "clienthello",
    "ClientHelloError": "clienthello",
    "ClientHelloReader": "clienthello",
    "NotTLS": "clienthello",
    "CAError": "contexts",
    "clientCreator": "contexts",
    "CertificateAuthority": "ca",
    "createCA": "ca",
    "loadOrCreateCA": "ca",
    "ServerContextCache": "hostcontexts",
    "mintLeaf": "mint",
    "newLeafKey": "mint",
    "normalizeHost": "mint",
    "parseHost": "mint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
