# -*- test-case-name: tests.test_ftp -*-
"""
An ftp:// request as the upstream side of an exchange (L{gateway.exchange.side.Upstream}):
Twisted's own FTP client on the control connection, a passive data connection per
transfer, the answer as HTTP response events.

What one fetch does, on one control connection (closed at the end: FTP sessions are not
pooled):

1. connect through the L{Dialer} (destination policy, name resolved once, the address
   checked is the address dialled), after checking the port against C{ftp_ports};
2. log in (Twisted's C{FTPClient}: USER, PASS, TYPE I), anonymously or as the URL or an
   C{Authorization: Basic} field says;
3. C{CWD} into each directory of the path; then for a last segment, C{CWD} into it too:
   when that works it is a directory (listed), else a file;
4. a file: C{SIZE} (Content-Length when the server tells), then EPSV (PASV when the server
   does not know EPSV), a data connection, C{RETR}; a listing: the same with C{LIST}
   (C{NLST} for C{;type=d}). HEAD stops before the data connection when the size is known.

The data connection goes to the control connection's address, whatever a PASV reply says
(the FTP bounce: a reply naming another host would make the proxy connect where the FTP
server wants), to a port in C{ftp_data_ports}, and through the same L{Dialer} and policy
as every other connection. Twisted's C{FTPClient.retrieveFile} is not used for it: it
connects through the global reactor's C{connectTCP}, knows only PASV, and hides when the
data connection is up (Twisted's own server wants it up before C{LIST}).

The file streams: each read of the data connection is one C{responseData}, and
C{pause()} pauses the data connection's transport (the FTP server's sends then fill the
TCP window and stop), so a slow client holds a bounded amount of memory whatever the file
size. The response head is sent with the first byte (or at the end of an empty file), so
a failure before it is still an error status.

Credentials never reach a log line or a response: only the reply code and text of a
refused login do.
"""

from __future__ import annotations

import base64
import binascii

from attrs import frozen
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.ftp import CommandFailed, FTPClient
from twisted.python.failure import Failure

from ..exchange.problems import Problem
from ..http1.parse import HTTPError
from ..message import NO_BODY, UNKNOWN, Response
from ..policy import formatPortRanges, portAllowed
from ..proxy.dial import DestinationDenied, DialError, problemFor
from .replies import (
    LISTING_TYPE,
    ListingText,
    PassiveReplyError,
    contentType,
    parsePassivePort,
    replyCode,
    replyText,
    statusFor,
)
from .url import ANONYMOUS, Credentials, FTPPath, parseFTPPath

__all__ = ["FTPFetch", "FTPSettings"]

_log = Logger(namespace="proxygate.ftp")

#: The problem code of a failure before any answer, by status (a bad path is the client's).
_CODES = {400: "bad_request", 502: "protocol", 504: "timeout"}

#: The version the response heads carry: the protocol the "origin" spoke.
VERSION = b"FTP"
#: Continuation lines one reply may have (a server sending endless "123-" lines must not
#: grow memory without bound).
MAX_REPLY_LINES = 1000
#: Replies to a command the server does not have (EPSV on an RFC 959 server): 500-504,
#: and 522 (RFC 2428: network protocol not supported).
_NOT_UNDERSTOOD = frozenset({500, 501, 502, 504, 522})
_TEXT = b"text/plain; charset=utf-8"
_REASONS = {401: b"Unauthorized", 404: b"Not Found", 405: b"Method Not Allowed"}


@frozen
class FTPSettings:
    """
    The FTP gateway's limits. C{ports}: where control connections may go ([proxy]
    ftp_ports); C{dataPorts}: the passive data ports accepted from a server ([proxy]
    ftp_data_ports); C{timeout}: the longest silence of a server, for a reply or for
    data while the client is reading ([proxy] idle_timeout).
    """

    ports: tuple[tuple[int, int], ...] = ((21, 21), (1024, 65535))
    dataPorts: tuple[tuple[int, int], ...] = ((1024, 65535),)
    timeout: float = 300.0

    @classmethod
    def fromConfig(cls, proxy) -> FTPSettings:
        """From a L{gateway.config.ProxyConfig}."""
        return cls(proxy.ftp_ports, proxy.ftp_data_ports, proxy.idle_timeout)


class _Outcome(Exception):
    """How a fetch ends before its response started: an answer, or a failure status."""

    def __init__(self, status: int, message: str, answer: bool = False, code: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.answer = answer  # a response of the FTP gateway (401, 404), not a failure
        self.code = code  # the FTP reply code behind it, if any


class _Control(FTPClient):
    """Twisted's FTP client, remembering why it failed and feeding the fetch's timer."""

    def __init__(self, fetch: FTPFetch, credentials: Credentials) -> None:
        self.fetch = fetch
        self.firstError = None
        super().__init__(credentials.user, credentials.password, passive=1)

    def fail(self, error):
        if self.firstError is None:
            self.firstError = error
        if self.transport is not None:
            return super().fail(error)
        return self._fail(error)

    def lineReceived(self, line: bytes) -> None:
        self.fetch._touch()
        if len(self.response) >= MAX_REPLY_LINES:
            self.transport.abortConnection()
            return
        super().lineReceived(line)

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self.fetch._controlLost()


class _Data(Protocol):
    """The passive data connection: bytes to the fetch, and its end."""

    def __init__(self, fetch: FTPFetch) -> None:
        self.fetch = fetch
        self.lost: defer.Deferred = defer.Deferred()  # fires (with None) at the end
        self.reason = None  # why it ended: ConnectionDone when the server closed it

    def connectionMade(self) -> None:
        self.fetch._dataConnected(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.fetch._dataReceived(data)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        self.lost.callback(None)


def _authorization(fields) -> Credentials | None:
    """Credentials from an C{Authorization: Basic} field (Squid's way for FTP logins)."""
    for name, value in fields:
        if name.lower() != b"authorization":
            continue
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return None
        try:
            decoded = base64.b64decode(token.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        user, sep, password = decoded.partition(b":")
        if not sep or not user or any(c in decoded for c in b"\r\n\x00"):
            return None
        return Credentials(user.decode("latin-1"), password.decode("latin-1"))
    return None


class _Brake:
    """The fetch as a push producer: a full client connection pauses the data connection."""

    __slots__ = ("fetch",)

    def __init__(self, fetch: FTPFetch) -> None:
        self.fetch = fetch

    def pauseProducing(self) -> None:
        self.fetch.pause()

    def resumeProducing(self) -> None:
        self.fetch.resume()

    def stopProducing(self) -> None:
        pass


class FTPFetch:
    """
    One ftp:// request (GET or HEAD) as an upstream side. See the module docstring.

    @ivar ip: the FTP server's address once connected (the access log's hierarchy).
    """

    def __init__(
        self,
        events,
        dialer,
        settings: FTPSettings,
        credentials: Credentials | None = None,
        reactor=None,
    ) -> None:
        """
        @param events: the exchange (L{gateway.exchange.side.UpstreamEvents}).
        @param dialer: the L{gateway.proxy.dial.Dialer} every connection goes through.
        @param settings: the limits (L{FTPSettings.fromConfig}).
        @param credentials: the URL's user and password (L{FTPTarget.credentials}); None:
            the request's C{Authorization: Basic} field, else anonymous.
        @param reactor: for the timer and deferred answers; the dialer's by default.
        """
        self.events = events
        self.viaProxy = False  # an FTP server is always reached directly
        # What the client's connection pauses when it cannot take more (throttle): the
        # data connection's reading.
        self.producer = _Brake(self)
        self.dialer = dialer
        self.settings = settings
        self.credentials = credentials
        self.reactor = reactor if reactor is not None else dialer.reactor
        self.ip = "-"
        self.control: _Control | None = None
        self.data = None  # the data connection's transport
        self.host = ""
        self.path: FTPPath | None = None
        self.head = False
        self._paused = False
        self._done = False
        self._timedOut = False
        self._controlGone = False
        self._timer = None
        self._started = False  # the response head was delivered
        self._size: int | None = None
        self._received = 0
        self._listingText: ListingText | None = None  # a listing being streamed

    # -- the Upstream side ------------------------------------------------------------------

    def attach(self, exchange) -> None:
        self.events = exchange

    def sendHead(self, request) -> None:
        """Start the fetch of C{request} (a L{gateway.message.Request})."""
        self.host = request.host
        if request.method not in (b"GET", b"HEAD"):
            self._later(
                self._answer,
                405,
                "An ftp:// URL can only be fetched (GET or HEAD) through this proxy.",
                ((b"Allow", b"GET, HEAD"),),
            )
            return
        self.head = request.method == b"HEAD"
        try:
            self.path = parseFTPPath(request.path)
        except HTTPError as e:
            self._later(self._failed, e.status, e.reason)
            return
        if not portAllowed(self.settings.ports, request.port):
            allowed = formatPortRanges(self.settings.ports) or "nothing"
            denied = DestinationDenied(
                f"port {request.port} is not in ftp_ports ({allowed})", reason="port"
            )
            self._later(self._unavailable, denied)
            return
        credentials = self.credentials or _authorization(request.fields) or ANONYMOUS
        self._run(request, credentials)

    def sendData(self, data: bytes) -> None:
        """A body of a GET (rare, meaningless here) is dropped."""

    def end(self, trailers=None) -> None:
        pass

    def abort(self) -> None:
        self._finish(abort=True)

    def pause(self) -> None:
        self._paused = True
        self._cancelTimer()
        if self.data is not None:
            self.data.pauseProducing()

    def resume(self) -> None:
        self._paused = False
        if self.data is not None:
            self.data.resumeProducing()
        if not self._done:
            self._touch()

    def throttle(self, other) -> None:
        """Nothing is sent upstream after the head: there is nothing to hold back."""

    def flush(self) -> None:
        pass

    def release(self, reuse: bool) -> None:
        """FTP sessions are not pooled: log out and close."""
        self._finish()

    # -- the fetch ---------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _run(self, request, credentials: Credentials):
        control = self.control = _Control(self, credentials)
        self._touch()
        try:
            self.ip = yield self.dialer.connect(request.host, request.port, control)
        except Exception as e:
            self._unavailable(e)
            return
        if self._done:
            control.transport.loseConnection()
            return
        try:
            for directory in self.path.directories:
                yield self._command(f"CWD {directory}", "path")
            if self.path.listing:
                yield self._listing()
            else:
                yield self._file()
        except _Outcome as outcome:
            if outcome.answer:
                self._answer(outcome.status, outcome.message)
            else:
                self._failed(outcome.status, outcome.message)
        except Exception:
            _log.failure("FTP fetch of {url}", url=f"ftp://{self.host}{self.path.shown()}")
            self._failed(502, "The FTP gateway failed; see the proxy's log.")

    @defer.inlineCallbacks
    def _file(self):
        name = self.path.name
        try:
            yield self._command(f"CWD {name}", "path")
        except _Outcome as outcome:
            if outcome.status != 404:
                raise
        else:
            yield self._listing()
            return
        ascii = self.path.type == "a"
        if ascii:
            yield self._command("TYPE A", "other")
        else:
            try:
                lines = yield self._command(f"SIZE {name}", "path")
            except _Outcome as outcome:
                if outcome.status == 404:
                    raise
                # SIZE is RFC 3659, not every server has it: no Content-Length then.
            else:
                size = lines[-1][4:].strip()
                self._size = int(size) if size.isdigit() and len(size) < 20 else None
        kind = contentType(name, ascii)
        if self.head and self._size is not None:
            self._respond(kind, 0, statedLength=self._size)
            self.events.responseEnd()
            self._finish()
            return
        yield self._transfer(f"RETR {name}", kind)

    @defer.inlineCallbacks
    def _listing(self):
        if self.head:
            self._respond(LISTING_TYPE, 0)
            self.events.responseEnd()
            self._finish()
            return
        self._listingText = ListingText()
        if self.path.type != "d":
            yield self._transfer("LIST", LISTING_TYPE)
            return
        try:
            yield self._transfer("NLST", LISTING_TYPE)
        except _Outcome as outcome:
            if outcome.code not in (500, 501) or self._started:
                raise
            # Some servers (Twisted's) want an argument: the current directory.
            yield self._transfer("NLST .", LISTING_TYPE)

    @defer.inlineCallbacks
    def _transfer(self, command: str, kind: bytes):
        """A passive data connection, C{command}, and the bytes it brings as the body."""
        self._kind = kind
        data = yield self._openData()
        reply = self._command(command, "path")
        try:
            # Both the transfer's final reply (226) and the end of the data connection:
            # either may come first, and the last bytes may still wait behind a pause.
            yield defer.DeferredList([reply, data.lost], fireOnOneErrback=True, consumeErrors=True)
        except defer.FirstError as e:
            if self._done:
                return
            if self.data is not None:
                self.data.abortConnection()
                self.data = None
            if self._started:
                self._lost(f"the transfer failed: {e.subFailure.getErrorMessage()}")
                return
            e.subFailure.raiseException()  # an _Outcome: 404, 502, 504
        if self._done:
            return
        if not data.reason.check(ConnectionDone):
            self._lost(f"the data connection broke: {data.reason.getErrorMessage()}")
            return
        if self._size is not None and self._received != self._size and not self.head:
            self._lost(f"{self._received} bytes of {self._size} arrived")
            return
        if not self._started:
            self._respond(kind, 0 if self._size is None or self.head else self._size)
        elif self._listingText is not None and (rest := self._listingText.flush()):
            self.events.responseData(rest)
        self.events.responseEnd()
        self._finish()

    @defer.inlineCallbacks
    def _openData(self):
        """EPSV (else PASV), the port checked, a connection to the control's address."""
        try:
            lines = yield self._command("EPSV", "other")
        except _Outcome as outcome:
            if outcome.code not in _NOT_UNDERSTOOD:
                raise
            lines = yield self._command("PASV", "other")  # RFC 959 servers without EPSV
        try:
            port = parsePassivePort(lines)
        except PassiveReplyError as e:
            raise _Outcome(502, f"The FTP server's passive reply is unusable: {e}.")
        if not portAllowed(self.settings.dataPorts, port):
            allowed = formatPortRanges(self.settings.dataPorts)
            raise _Outcome(
                502, f"The FTP server offered data port {port}, outside ftp_data_ports ({allowed})."
            )
        receiver = _Data(self)
        peer = self.control.transport.getPeer().host
        try:
            yield self.dialer.connect(peer, port, receiver)
        except DestinationDenied as e:
            raise _Outcome(502, f"The FTP data connection is not allowed: {e.detail}.")
        except DialError as e:
            raise _Outcome(e.status, f"Cannot open the FTP data connection: {e.message}.")
        return receiver

    def _command(self, text: str, stage: str) -> defer.Deferred:
        """One command; its reply lines, or an L{_Outcome} for a refusal or a lost server."""
        if self._done or self._controlGone or self.control is None:
            return defer.fail(_Outcome(502, "The FTP server closed the connection."))
        d = self.control.queueStringCommand(text)
        d.addErrback(self._refused, stage)
        return d

    def _refused(self, failure, stage: str):
        if self._timedOut:
            raise _Outcome(504, "The FTP server did not answer in time.")
        if failure.check(CommandFailed):
            lines = failure.value.args[0]
            code = replyCode(lines)
            status = statusFor(code, stage)
            raise _Outcome(status, self._message(status, lines), status != 502, code)
        first = self.control.firstError if self.control is not None else None
        if first is not None and first.check(CommandFailed):
            lines = first.value.args[0]
            status = statusFor(replyCode(lines), "login")
            raise _Outcome(status, self._message(status, lines), answer=status != 502)
        raise _Outcome(502, "The FTP server closed the connection.")

    def _message(self, status: int, lines: list[str]) -> str:
        said = replyText(lines)
        if status == 401:
            return f"The FTP server refused the login ({said}); send other credentials."
        if status == 404:
            return f"The FTP server has no {self.path.shown()} ({said})."
        return f"The FTP server refused the request: {said}."

    # -- the data connection --------------------------------------------------------------

    def _dataConnected(self, transport) -> None:
        self.data = transport
        if self._paused:
            transport.pauseProducing()

    def _dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._touch()
        if not self._started:
            if self.head:
                # A HEAD whose size the server would not tell: the first byte shows the
                # file is there; nothing more is read.
                self._respond(self._kind, 0)
                self.events.responseEnd()
                self._finish(abort=True)
                return
            self._respond(self._kind, UNKNOWN if self._size is None else self._size)
        self._received += len(data)
        if self._listingText is not None:
            data = self._listingText.feed(data)
        self.events.responseData(data)
        self.events.responseFlush()

    # -- answers ---------------------------------------------------------------------------

    def _respond(self, kind: bytes, length, statedLength: int | None = None) -> None:
        self._started = True
        if self.head:
            length = NO_BODY  # a HEAD states the length a GET would get
        stated = None if statedLength is None else b"%d" % statedLength
        self.events.responseHead(
            Response(200, b"OK", VERSION, [(b"Content-Type", kind)], length, stated)
        )

    def _answer(self, status: int, message: str, extra=()) -> None:
        """A small text/plain answer of the gateway itself (401, 404, 405)."""
        if self._done:
            return
        body = message.encode("utf-8") + b"\n"
        fields = [(b"Content-Type", _TEXT), *extra]
        if status == 401:
            realm = self.host.encode("ascii", "replace").replace(b'"', b"")
            fields.append((b"WWW-Authenticate", b'Basic realm="FTP %s"' % realm))
        self._started = True
        self.events.responseHead(
            Response(
                status, _REASONS.get(status, b""), VERSION, fields, 0 if self.head else len(body)
            )
        )
        if not self.head:
            self.events.responseData(body)
        self.events.responseEnd()
        self._finish()

    def _failed(self, status: int, message: str) -> None:
        if self._done:
            return
        self._finish(abort=True)
        self.events.upstreamFailed(Problem(status, _CODES.get(status, "protocol"), message))

    def _unavailable(self, error: Exception) -> None:
        """The control connection was not made (a dial failure, a refused port)."""
        if self._done:
            return
        self._finish(abort=True)
        problem = problemFor(error)
        if problem.code == "internal":
            _log.failure("FTP to {host}", Failure(error), host=self.host)
        self.events.upstreamFailed(problem)

    def _lost(self, reason: str) -> None:
        if self._done:
            return
        self._finish(abort=True)
        status = 0 if self._started else 502
        self.events.upstreamLost(
            Problem(status, "incomplete", f"The FTP transfer failed: {reason}.")
        )

    def _later(self, f, *args) -> None:
        """An answer known in sendHead, delivered on the next turn (never re-entrantly)."""
        self.reactor.callLater(0, f, *args)

    # -- time and the end ----------------------------------------------------------------

    def _touch(self) -> None:
        """The server said something: its silence is counted from now."""
        if self._done or self._paused:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.settings.timeout)
        else:
            self._timer = self.reactor.callLater(self.settings.timeout, self._silent)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _silent(self) -> None:
        self._timer = None
        self._timedOut = True
        if not self._started:
            self._failed(504, "The FTP server did not answer in time.")
        else:
            self._lost("the FTP server went silent")

    def _controlLost(self) -> None:
        """The control connection closed: no further command can be sent."""
        self._controlGone = True

    def _finish(self, abort: bool = False) -> None:
        """Close both connections (QUIT first when the session ended well)."""
        if self._done:
            return
        self._done = True
        self._cancelTimer()
        data, self.data = self.data, None
        if data is not None:
            if abort:
                data.abortConnection()
            else:
                data.loseConnection()
        control = self.control
        if control is not None and control.transport is not None:
            if abort:
                control.transport.abortConnection()
            else:
                control.sendLine("QUIT")
                control.transport.loseConnection()
