"""
proxygate-doctor: for the person behind the proxy whose pip, curl or git fails. It reads
the settings their tools would use, fetches a URL through them step by step (TCP to the
proxy, the CONNECT answer, the TLS handshake, the HTTP answer) and says what is wrong and
the one command that fixes it.

Standard library only, and it never imports Twisted (L{gateway}'s package import is lazy
for that): it must start fast on any machine that has the package.

- L{gateway.doctor.settings}: which proxy and CA bundle each tool family would use (pure)
- L{gateway.doctor.probe}: the fetch over sockets, step by step
- L{gateway.doctor.x509}: issuer and subject names of a certificate nobody verified
- L{gateway.doctor.diagnose}: findings in plain words, with the fix (pure)
- L{gateway.doctor.cli}: the command line, text and JSON output
"""

from .cli import main

__all__ = ["main"]
