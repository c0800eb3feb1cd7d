# -*- test-case-name: tests.test_tlsgroups -*-
"""
The TLS key exchange groups of every context proxygate makes: X25519, P-256 and P-384
(Mozilla's "intermediate" profile). OpenSSL 3's defaults also offer and accept X448,
P-521 and the finite-field groups, which scanners (sslyze) flag.

How, since Python's ssl module before 3.15 cannot set a list of groups:

- C{SSLContext.set_ecdh_curve} sets exactly one group (OpenSSL 3: C{SSL_CTX_set1_groups}
  with one NID): X25519 alone would lock out P-256-only clients (FIPS-mode stacks, some
  Java and Windows versions), and P-256 alone would throw X25519 away.
- C{set_ciphers} cannot: groups are not ciphers in TLS 1.3.
- ctypes into libssl's C{SSL_CTX_set1_groups_list} through the context's pointer would
  work but relies on CPython's object layout: not acceptable.
- OpenSSL's own configuration can: the C{Groups} command of an C{ssl_conf}
  C{system_default} section is applied by OpenSSL to every C{SSL_CTX} it creates, server
  and client. The configuration file is read once, when the process first initialises
  OpenSSL, so C{OPENSSL_CONF} must name it before that: at process start.

So proxygate ships that file (L{CONFIG}) and:

- C{twistd proxygate} re-executes itself once, before anything listens or is logged, with
  C{OPENSSL_CONF} naming it (L{ensureLimited}) when the process does not limit the groups
  already; the process id, arguments and file descriptors stay the same. To skip the
  re-execution, start it with C{OPENSSL_CONF} set (to L{CONFIG}, or to your own
  configuration with the same C{Groups} line: proxygate never overrides a set
  C{OPENSSL_CONF}, it checks what it gets and warns).
- worker processes get C{OPENSSL_CONF} in their environment (L{childEnvironment}).
- an application embedding the service is told in its log when its process does not limit
  the groups, with what to do (L{checkGroups}).
- on Python 3.15 and later, L{applyGroups} sets them on each context directly
  (C{SSLContext.set_groups}), and none of the above is needed.

L{offeredGroups} verifies the result without a peer: it builds a client context as
proxygate would, lets OpenSSL write its ClientHello into memory, and reads the
supported_groups extension from it.
"""

from __future__ import annotations

import os
import ssl
import sys
from pathlib import Path

from twisted.logger import Logger

__all__ = [
    "CONFIG",
    "GROUPS",
    "applyGroups",
    "checkGroups",
    "childEnvironment",
    "ensureLimited",
    "offeredGroups",
    "parseSupportedGroups",
]

_log = Logger(namespace="proxygate")

#: The groups, in OpenSSL's names (preference order).
GROUPS = ("X25519", "P-256", "P-384")
#: Their TLS code points (RFC 8446 §4.2.7): x25519, secp256r1, secp384r1.
ALLOWED_IDS = frozenset({0x001D, 0x0017, 0x0018})
#: Names of the code points a scan reports, for messages.
GROUP_NAMES = {
    0x0017: "P-256",
    0x0018: "P-384",
    0x0019: "P-521",
    0x001D: "X25519",
    0x001E: "X448",
    0x0100: "ffdhe2048",
    0x0101: "ffdhe3072",
    0x0102: "ffdhe4096",
    0x0103: "ffdhe6144",
    0x0104: "ffdhe8192",
}
#: The OpenSSL configuration file that limits the groups (shipped with the package).
CONFIG = str(Path(__file__).with_name("openssl-groups.cnf"))
#: Set in the environment of the re-executed process, so it never re-executes again.
_REEXECUTED = "PROXYGATE_TLS_GROUPS_REEXEC"


def applyGroups(context: ssl.SSLContext) -> None:
    """Set the groups on C{context} where Python can (3.15+); else the process config does."""
    setGroups = getattr(context, "set_groups", None)
    if setGroups is not None:
        setGroups(":".join(GROUPS))


def parseSupportedGroups(clientHello: bytes) -> tuple[int, ...] | None:
    """
    The group code points of the supported_groups extension of a ClientHello record
    (RFC 8446 §4.1.2, §4.2.7), or None when the bytes are not a ClientHello that has one.
    """
    try:
        if clientHello[0] != 0x16 or clientHello[5] != 0x01:
            return None
        at = 5 + 4 + 2 + 32  # record header, handshake header, legacy_version, random
        at += 1 + clientHello[at]  # session id
        at += 2 + int.from_bytes(clientHello[at : at + 2], "big")  # cipher suites
        at += 1 + clientHello[at]  # compression methods
        end = at + 2 + int.from_bytes(clientHello[at : at + 2], "big")
        at += 2
        while at + 4 <= end:
            kind = int.from_bytes(clientHello[at : at + 2], "big")
            size = int.from_bytes(clientHello[at + 2 : at + 4], "big")
            body = clientHello[at + 4 : at + 4 + size]
            if kind == 0x000A:
                count = int.from_bytes(body[:2], "big") // 2
                return tuple(
                    int.from_bytes(body[2 + 2 * i : 4 + 2 * i], "big") for i in range(count)
                )
            at += 4 + size
    except IndexError:
        return None
    return None


def offeredGroups() -> tuple[int, ...]:
    """
    The groups a client context of this process offers (what OpenSSL's configuration and
    L{applyGroups} leave), read from the ClientHello it writes into memory. The server
    side follows the same configuration.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    applyGroups(context)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="groups.invalid")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    groups = parseSupportedGroups(outgoing.read())
    return groups if groups is not None else ()


def _describe(groups: tuple[int, ...]) -> str:
    return ", ".join(GROUP_NAMES.get(g, f"0x{g:04x}") for g in groups) or "none"


def checkGroups() -> bool:
    """
    Whether this process limits the groups; when it does not, log once what it offers
    and how to limit them.
    """
    groups = offeredGroups()
    extra = tuple(g for g in groups if g not in ALLOWED_IDS)
    if not extra:
        return True
    own = os.environ.get("OPENSSL_CONF")
    how = (
        f"add 'Groups = {':'.join(GROUPS)}' to the system_default section of {own}"
        if own
        else f"start the process with OPENSSL_CONF={CONFIG}"
    )
    _log.warn(
        "TLS: this process offers the key exchange groups {groups}, not only {wanted}: {how}",
        groups=_describe(groups),
        wanted=", ".join(GROUPS),
        how=how,
    )
    return False


def ensureLimited() -> None:
    """
    For C{twistd proxygate}, before anything listens: re-execute the process with
    C{OPENSSL_CONF} naming L{CONFIG} when it does not limit the groups and nothing says
    not to (an C{OPENSSL_CONF} of its own, or an earlier re-execution). Returns when no
    re-execution is needed; otherwise it does not return.
    """
    if not any(g not in ALLOWED_IDS for g in offeredGroups()):
        return
    if os.environ.get("OPENSSL_CONF") or os.environ.get(_REEXECUTED):
        checkGroups()
        return
    env = {**os.environ, "OPENSSL_CONF": CONFIG, _REEXECUTED: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def childEnvironment(env: dict[str, str]) -> dict[str, str]:
    """C{env} for a proxygate process started by this one: OPENSSL_CONF unless set."""
    if not env.get("OPENSSL_CONF"):
        env = {**env, "OPENSSL_CONF": CONFIG}
    return env
