"""
Access log lines in Squid's native format (the default: existing log tooling reads it),
Apache combined, or JSON, emitted through twisted.logger.

Lines are built only from validated, proxy-owned values: the URL without its query string
(Squid's strip_query_terms) and never a header value, so credentials cannot leak into logs.
"""

from __future__ import annotations

import json
import time

from attrs import frozen
from twisted.logger import Logger, LogLevel, formatEvent

_log = Logger(namespace="proxygate")

__all__ = ["AccessLog", "AccessLogFile", "AccessRecord", "hierarchy"]


@frozen
class AccessRecord:
    """One finished transaction, as the log formats need it."""

    start: float  # wall-clock time the request head was complete
    elapsed: float  # seconds
    client: str
    code: int  # 0 when no response was sent
    size: int  # bytes sent to the client
    method: str
    url: str
    user: str | None
    action: str  # Squid result code: TCP_MISS, TCP_TUNNEL, TCP_DENIED, ...
    hierarchy: str  # HIER_DIRECT/ip, HIER_NONE/-
    contentType: str
    mode: str  # forward | tunnel | mitm | local
    reason: str | None = None  # why a request was refused or failed
    version: str = "HTTP/1.1"


def hierarchy(ip: str, viaUpstream: bool) -> str:
    """Squid's hierarchy field: how the request left (direct, through a parent, or not)."""
    if ip == "-":
        return "HIER_NONE/-"
    return f"{'FIRSTUP_PARENT' if viaUpstream else 'HIER_DIRECT'}/{ip}"


def squidLine(r: AccessRecord) -> str:
    return (
        f"{r.start:.3f} {round(r.elapsed * 1000):6d} {r.client} {r.action}/{r.code:03d} "
        f"{r.size} {r.method} {r.url} {r.user or '-'} {r.hierarchy} {r.contentType or '-'}"
    )


def combinedLine(r: AccessRecord) -> str:
    stamp = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(r.start))
    return (
        f'{r.client} - {r.user or "-"} [{stamp}] "{r.method} {r.url} {r.version}" '
        f'{r.code} {r.size} "-" "-"'
    )


def jsonLine(r: AccessRecord) -> str:
    return json.dumps(
        {
            "time": round(r.start, 3),
            "elapsed_ms": round(r.elapsed * 1000, 3),
            "client": r.client,
            "action": r.action,
            "code": r.code,
            "bytes": r.size,
            "method": r.method,
            "url": r.url,
            "user": r.user,
            "hierarchy": r.hierarchy,
            "content_type": r.contentType or None,
            "mode": r.mode,
            "reason": r.reason,
        },
        separators=(",", ":"),
    )


_FORMATS = {"squid": squidLine, "combined": combinedLine, "json": jsonLine}


class AccessLog:
    """
    Formats records and emits them as twisted.logger events in the C{proxygate.access}
    namespace, to the global log (the twistd log) or to a private observer (a file).
    """

    def __init__(self, format: str = "squid", observer=None) -> None:
        self._format = _FORMATS[format]
        self._log = Logger(namespace="proxygate.access", observer=observer)

    def record(self, r: AccessRecord) -> None:
        line = self._format(r)
        self._log.emit(LogLevel.info, "{line}", line=line, record=r)


class AccessLogFile:
    """
    The access log file: appended to, written through a buffer that its owner flushes on a
    timer and at shutdown (as Squid does, so logging costs no system call per request), and
    reopened by name on SIGHUP and SIGUSR1, so that after logrotate's rename new lines go
    to a new file instead of following the old one.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.stream = self._open()

    def _open(self):
        return open(self.path, "a", encoding="utf-8")

    def observe(self, event: dict) -> None:
        """A log observer writing just the access line, one per line."""
        self.stream.write(formatEvent(event) + "\n")

    def reopen(self) -> None:
        """Open the path again (a new file after a rename); on failure keep writing the old."""
        try:
            stream = self._open()
        except OSError as e:
            _log.error(
                "Cannot reopen the access log {path} ({problem}); still writing the open file",
                path=self.path,
                problem=e.strerror or str(e),
            )
            return
        old, self.stream = self.stream, stream
        old.close()

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()
