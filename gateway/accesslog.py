"""
The access log: records (L{gateway.accessrecord}) formatted and emitted through
twisted.logger, to the twistd log or to a file that logrotate can rotate.

Lines are built only from validated, proxy-owned values: the URL without its query string
(Squid's strip_query_terms) and never a header value, so credentials cannot leak into logs.
"""

from __future__ import annotations

from twisted.logger import Logger, LogLevel, formatEvent

from .accessrecord import FORMATS, AccessRecord, hierarchy, routeHierarchy

_log = Logger(namespace="proxygate")

__all__ = ["AccessLog", "AccessLogFile", "AccessRecord", "hierarchy", "routeHierarchy"]


class AccessLog:
    """
    Formats records and emits them as twisted.logger events in the C{proxygate.access}
    namespace, to the global log (the twistd log) or to a private observer (a file).
    """

    def __init__(self, format: str = "squid", observer=None) -> None:
        self._format = FORMATS[format]
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
