"""
Playbooks for the sans-IO exchange: sides and an environment that record every call, so a
test says "these events in, these actions out" (as mitmproxy's layer tests do), in
milliseconds and without a socket.

    env = PlaybookEnv()
    down = RecordingDownstream(env.actions)
    exchange = Exchange(env, down, request, mode="forward")
    exchange.begin()
    assert env.take() == [("open", "example.com", 80, False)]
"""

from __future__ import annotations

from twisted.internet.task import Clock

from gateway.exchange.answers import answer
from gateway.message import NO_BODY, Request, Response
from gateway.metrics import Metrics


class RecordingLog:
    def __init__(self) -> None:
        self.records: list = []

    def record(self, record) -> None:
        self.records.append(record)


class _Producer:
    def __init__(self, name: str) -> None:
        self.name = name


class Recording:
    """A side that records what is asked of it as (name.method, *args) tuples."""

    def __init__(self, actions: list, name: str) -> None:
        self.actions = actions
        self.name = name
        self.producer = _Producer(name)

    def _did(self, what: str, *args) -> None:
        self.actions.append((f"{self.name}.{what}", *args))

    def sendData(self, data: bytes) -> None:
        self._did("sendData", data)

    def end(self, trailers=None) -> None:
        self._did("end", trailers)

    def abort(self) -> None:
        self._did("abort")

    def pause(self) -> None:
        self._did("pause")

    def resume(self) -> None:
        self._did("resume")

    def throttle(self, other) -> None:
        self._did("throttle", None if other is None else other.name)

    def flush(self) -> None:
        self._did("flush")

    def takeStream(self):
        self._did("takeStream")
        return f"{self.name}-stream"


class RecordingDownstream(Recording):
    client = "203.0.113.7"

    def __init__(self, actions: list, name: str = "down") -> None:
        super().__init__(actions, name)

    def sendHead(self, response: Response) -> None:
        self._did("sendHead", response.status, list(response.fields), response.proxyFields)


class RecordingUpstream(Recording):
    def __init__(self, actions: list, name: str = "up", ip: str = "192.0.2.1") -> None:
        super().__init__(actions, name)
        self.ip = ip
        self.viaProxy = False
        self.exchange = None

    def attach(self, exchange) -> None:
        self.exchange = exchange

    def sendHead(self, request: Request) -> None:
        self._did("sendHead", request.method, request.path, request.proxyFields)

    def release(self, reuse: bool) -> None:
        self._did("release", reuse)


class RecordingConnector:
    def __init__(self, actions: list) -> None:
        self.actions = actions

    def open(self, request: Request, exchange, fresh: bool = False) -> None:
        self.actions.append(("open", request.host, request.port, fresh))


class PlaybookEnv:
    """The exchange's environment, recording what it is asked to do."""

    def __init__(self, *, via: bytes = b"proxygate", forwardedFor: bool = False) -> None:
        self.actions: list = []
        self.clock = Clock()
        self.now = self.clock.seconds
        self.metrics = Metrics()
        self.accessLog = RecordingLog()
        self.connector = RecordingConnector(self.actions)
        self.forwardedFor = forwardedFor
        self.viaRequest = {b"HTTP/1.1": [(b"Via", b"1.1 " + via)]} if via else {}
        self.viaResponse = self.viaRequest
        self.answer = answer

    def splice(self, client, origin, onEnd) -> None:
        self.actions.append(("splice", client, origin))
        self.spliceEnded = onEnd

    def take(self) -> list:
        """The actions so far, forgetting them."""
        actions, self.actions[:] = list(self.actions), []
        return actions

    def requests(self) -> dict:
        """proxygate_requests_total as {(mode, method, code): count}."""
        return dict(self.metrics.live.requests)


def request(
    method: bytes = b"GET",
    path: bytes = b"/x",
    *,
    length: int | None = NO_BODY,
    fields=None,
    upgrade: bytes | None = None,
    host: str = "example.com",
    port: int = 80,
) -> Request:
    return Request(
        method,
        "http",
        host,
        port,
        host.encode() if port == 80 else f"{host}:{port}".encode(),
        path,
        b"HTTP/1.1",
        list(fields or [(b"Accept", b"*/*")]),
        length,
        upgrade,
    )


def response(
    status: int = 200,
    *,
    length: int | None = 2,
    fields=None,
    version: bytes = b"HTTP/1.1",
) -> Response:
    return Response(
        status, b"OK", version, list(fields or [(b"Server", b"o")]), length, None, b"text/plain"
    )
