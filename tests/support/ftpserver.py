"""
A real FTP server for the tests: Twisted's own (twisted.protocols.ftp.FTPFactory with an
FTPRealm on a folder), on 127.0.0.1.

- in process: L{listen} (the tests' reactor runs it), for the FTP side's tests;
- as a process: ``python tests/support/ftpserver.py ROOT [--bounce ADDRESS]`` prints its port and
  serves until killed, for the end-to-end tests through proxygate (L{FTPServerProcess} starts
  one and stops it by PID).

Anonymous users see ROOT/anonymous; ``alice`` / ``secret`` logs into ROOT/home/alice.
``bounce`` makes the server refuse EPSV and name ADDRESS in its PASV replies (the FTP
bounce): a client that obeys connects there, not to the server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.cred import credentials, error
from twisted.cred.checkers import AllowAnonymousAccess, ICredentialsChecker
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.protocols import ftp
from zope.interface import implementer

USER, PASSWORD = "alice", "secret"
_REPO = Path(__file__).resolve().parent.parent.parent


class _BounceFTP(ftp.FTP):
    """An FTP server whose PASV replies name another host, and that has no EPSV."""

    bounceTo = "127.0.0.2"

    def ftp_EPSV(self, protocol=""):
        return defer.fail(ftp.CmdNotImplementedError("EPSV"))

    def reply(self, key, *args):
        if key == ftp.ENTERING_PASV_MODE:
            _, port = ftp.decodeHostPort(args[0])
            args = (ftp.encodeHostPort(self.bounceTo, port),)
        return super().reply(key, *args)


@implementer(ICredentialsChecker)
class _OneUser:
    """USER / PASSWORD (Twisted's FTP server hands checkers str names and passwords, which
    its in-memory checker, keyed by bytes, never matches)."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def requestAvatarId(self, creds):
        if creds.username == USER and creds.password == PASSWORD:
            return defer.succeed(USER)
        return defer.fail(error.UnauthorizedLogin())


def layout(root: Path) -> tuple[Path, Path]:
    """The anonymous root and the users' homes under C{root} (created)."""
    anonymous, homes = root / "anonymous", root / "home"
    anonymous.mkdir(parents=True, exist_ok=True)
    (homes / USER).mkdir(parents=True, exist_ok=True)
    return anonymous, homes


def factory(root: Path, bounce: str | None = None) -> ftp.FTPFactory:
    anonymous, homes = layout(root)
    checker = _OneUser()
    portal = Portal(ftp.FTPRealm(str(anonymous), str(homes)), [AllowAnonymousAccess(), checker])
    made = ftp.FTPFactory(portal)
    made.noisy = False
    if bounce is not None:
        made.protocol = type("Bounce", (_BounceFTP,), {"bounceTo": bounce})
    return made


def listen(reactor, root: Path, bounce: str | None = None):
    """An FTP server on 127.0.0.1 (a free port) in C{reactor}: its listening port."""
    return reactor.listenTCP(0, factory(root, bounce), interface="127.0.0.1")


class FTPServerProcess:
    """tests/support/ftpserver.py in a process of its own, stopped by PID."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(root), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=_REPO,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(_REPO)},
        )
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            raise RuntimeError("the FTP server did not start")
        self.port = int(line)

    def url(self, path: str, userinfo: str = "") -> str:
        return f"ftp://{userinfo}127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    root = Path(argv[1])
    bounce = argv[argv.index("--bounce") + 1] if "--bounce" in argv else None
    port = listen(reactor, root, bounce)
    print(port.getHost().port, flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
