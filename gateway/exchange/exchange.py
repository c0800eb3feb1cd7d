"""
One request forwarded between a downstream side and an upstream side, and its response.

The exchange owns the semantics an intermediary adds to a request (RFC 9110): Via and
X-Forwarded-For, the retry of an idempotent request whose pooled connection had gone, 1xx
responses passed on (bounded), the switch to a blind pipe on 101, and what the client is
told when the next hop fails. It never sees bytes of a wire or a socket: each side frames
for its own wire (gateway/http1/rewrite.py for HTTP/1.1), and the environment (the
service's runtime, or a test's) opens upstream sides and splices streams.

Its life is a few phases, in one direction:

    CONNECTING -> SENDING -> RESPONDING -> DONE
                         \\-> UPGRADED (a 101: the two sides are spliced) -> DONE

plus one orthogonal fact, whether the request body is complete (the origin may answer
before it is: then the client's connection cannot carry another request).
"""

from __future__ import annotations

from ..message import NO_BODY, Fields, Request, Response
from .problems import Problem
from .transaction import Transaction

__all__ = ["MAX_INTERIM", "Exchange"]

CONNECTING = "connecting"  # waiting for an upstream side; request body bytes are held
SENDING = "sending"  # the request is going out; no response head yet
RESPONDING = "responding"  # the response head went to the client
UPGRADED = "upgraded"  # a 101: the sides are spliced
DONE = "done"  # logged; nothing more is done or accepted

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_NO_FIELDS: Fields = []

#: 1xx responses passed on per request; beyond, the origin is misbehaving (a stream of
#: `102 Processing` would otherwise be relayed without end): 502. Go's client stops at 5;
#: this leaves room for long WebDAV operations that report progress.
MAX_INTERIM = 50


class Exchange(Transaction):
    """
    The downstream side creates it with the parsed request and calls L{begin}; both sides
    then deliver their events (L{gateway.exchange.side}). It tells the downstream C{end()}
    (or C{abort()}) last, after the upstream side is released and the line is logged.
    """

    __slots__ = (
        "connector",
        "downstream",
        "interim",
        "pending",
        "phase",
        "request",
        "requestDone",
        "retried",
        "reused",
        "trailers",
        "upstream",
    )

    def __init__(
        self,
        env,
        downstream,
        request: Request,
        *,
        mode: str,
        user: str | None = None,
        connector=None,
    ) -> None:
        super().__init__(env, downstream.client, request.method, mode, user, request.version)
        self.downstream = downstream
        self.request = request
        self.connector = connector if connector is not None else env.connector
        self.upstream = None
        self.phase = CONNECTING
        self.pending: list[bytes] = []
        self.trailers: Fields | None = None  # request trailers that came while connecting
        self.requestDone = request.length == NO_BODY or request.length == 0
        self.reused = False
        self.retried = False
        self.interim = 0
        via = env.viaRequest.get(request.version, _NO_FIELDS)
        if env.forwardedFor:
            request.proxyFields = [*via, (b"X-Forwarded-For", self.client.encode("ascii"))]
        else:
            request.proxyFields = via

    def begin(self) -> None:
        """Ask for an upstream side (it may be ready before this returns)."""
        self.connector.open(self.request, self)

    # --- the upstream side arrives -----------------------------------------------------

    def upstreamReady(self, side, reused: bool) -> None:
        if self.phase != CONNECTING:
            side.release(False)  # the client left (or timed out) while it was dialled
            return
        self.upstream = side
        self.reused = reused
        self.ip = side.ip
        self.viaProxy = side.viaProxy
        self.phase = SENDING
        side.attach(self)
        downstream = self.downstream
        downstream.throttle(side)
        request = self.request
        length = request.length
        bodyless = length == NO_BODY or length == 0
        if not bodyless:
            # Only a body flows up: a request without one needs no brake on its client.
            side.throttle(downstream)
        side.sendHead(request)
        pending = self.pending
        if pending:
            self.pending = []
            for data in pending:
                side.sendData(data)
            # Everything received so far was pending.
            self.sentUpstream = self.received
        if self.requestDone and not bodyless:
            side.end(self.trailers)
        side.flush()
        if pending:
            downstream.resume()

    def upstreamUnavailable(self, problem: Problem) -> None:
        if self.phase != CONNECTING:
            return
        problem.count(self.env.metrics)
        self._answer(problem)

    # --- the request body, from the downstream ------------------------------------------

    def requestData(self, data: bytes) -> None:
        self.received += len(data)
        upstream = self.upstream
        if upstream is not None:
            self.sentUpstream += len(data)
            upstream.sendData(data)
        elif self.phase == CONNECTING:
            # Still dialling: hold this read, and read no more until connected.
            self.pending.append(data)
            self.downstream.pause()

    def requestEnd(self, trailers: Fields | None = None) -> None:
        self.requestDone = True
        if self.upstream is not None:
            self.upstream.end(trailers)
        else:
            self.trailers = trailers  # upstreamReady ends it once the pending bytes are out

    def requestFlush(self) -> None:
        """The end of one read's worth of request events (an HTTP/2 downstream says so)."""
        upstream = self.upstream
        if upstream is not None:
            upstream.flush()

    # --- the response, from the upstream -------------------------------------------------

    def responseHead(self, response: Response) -> None:
        if self.phase != SENDING:
            return
        status = response.status
        response.proxyFields = self.env.viaResponse.get(response.version, _NO_FIELDS)
        if status < 200:
            if status == 101:
                self._upgrade(response)
                return
            self.interim += 1
            if self.interim > MAX_INTERIM:
                self.upstreamFailed(
                    Problem(502, "protocol", f"The origin sent over {MAX_INTERIM} 1xx responses.")
                )
                return
            self.downstream.sendHead(response)
            return
        self.phase = RESPONDING
        self.code = status
        self.contentType = response.contentType
        self.ip = self.upstream.ip  # a side that dials after it is attached (FTP) knows it now
        if self.request.upgrade is not None:
            self.env.metrics.upgrades.labels("refused").inc()
        self.downstream.sendHead(response)

    def responseData(self, data: bytes) -> None:
        if self.phase == RESPONDING:
            self.sent += len(data)
            self.downstream.sendData(data)

    def responseFlush(self) -> None:
        # Also once DONE: the response may have ended in the batch this closes.
        if self.phase in (RESPONDING, DONE):
            self.downstream.flush()

    def responseEnd(self, trailers: Fields | None = None) -> None:
        if self.phase != RESPONDING:
            return
        self.phase = DONE
        upstream, self.upstream = self.upstream, None
        self._unthrottle(upstream)
        upstream.release(self.requestDone)
        self.record()
        self.downstream.end(trailers)

    def upstreamFailed(self, problem: Problem) -> None:
        """The upstream broke its protocol: 502 while nothing was sent, else a visible cut."""
        if self.phase not in (SENDING, RESPONDING):
            return
        problem.count(self.env.metrics)
        self._dropUpstream()
        if self.phase == RESPONDING:
            self._cut(problem)
        else:
            self._answer(problem)

    def upstreamLost(self, problem: Problem | None) -> None:
        """
        The upstream closed or reset before the response was complete. C{problem} says why
        when the side knows (a TLS failure); None is a plain close.
        """
        if self.phase not in (SENDING, RESPONDING):
            return
        self.upstream = None
        self.downstream.throttle(None)
        if self.phase == SENDING and self._mayRetry(problem):
            # A pooled connection the origin had already closed, or an HTTP/2 stream it
            # refused: the request never reached it, so one retry on a fresh connection is
            # safe (no body; idempotent, unless the origin said it processed nothing).
            self.retried = True
            self.reused = False
            self.phase = CONNECTING
            self.connector.open(self.request, self, fresh=True)
            return
        if problem is None:
            if self.phase == RESPONDING:
                problem = Problem(0, "incomplete", "The origin closed the connection mid-response.")
            else:
                problem = Problem(
                    502, "incomplete", "The origin closed the connection without a response."
                )
        problem.count(self.env.metrics)
        if self.phase == RESPONDING:
            self._cut(problem)
        else:
            self._answer(problem)

    def _mayRetry(self, problem: Problem | None) -> bool:
        length = self.request.length
        if self.retried or not (length == NO_BODY or length == 0):
            return False
        if problem is None:
            return self.reused and self.request.method in _IDEMPOTENT
        # RFC 9113 §8.7: a refused stream was not processed, whatever its method.
        return problem.code == "stream_refused"

    # --- the downstream's endings ----------------------------------------------------------

    def downstreamLost(self, problem: Problem | None = None) -> None:
        """
        The client went away mid-exchange (or sent a body that cannot be read on: then
        C{problem} says why): drop the upstream side too.
        """
        if self.phase == DONE or self.phase == UPGRADED:
            return
        self._dropUpstream()
        self.phase = DONE
        if problem is None:
            problem = Problem(0, "client_gone", "The client closed the connection.")
        elif self.code == 0 and problem.status:
            # Nothing was answered yet: the downstream answers the problem itself (a 400
            # for bad chunked framing, a 413 for a body over a route's limit).
            self.code = problem.status
            self.answered = True
        self.problem = problem
        self.record()

    def timedOut(self) -> None:
        """The client's idle deadline passed: 504 if the origin never answered, else a cut."""
        if self.phase == CONNECTING or self.phase == SENDING:
            problem = Problem(504, "timeout", "The origin did not answer in time.")
            problem.count(self.env.metrics)
            self._dropUpstream()
            self._answer(problem)
        elif self.phase == RESPONDING:
            self._dropUpstream()
            self._cut(Problem(0, "timeout", "The response stalled past the idle timeout."))

    # --- 101 ------------------------------------------------------------------------------

    def _upgrade(self, response: Response) -> None:
        """The origin switched protocols: relay its 101, then splice the two sides."""
        offer = self.request.upgrade
        if offer is None:
            # A 101 nobody asked for cannot be relayed (RFC 9110 §15.2.2).
            self.upstreamFailed(Problem(502, "protocol", "The origin switched protocols unasked."))
            return
        offered = {p.split(b"/")[0] for p in _tokens(offer)}
        chosen = _tokens(b", ".join(v for n, v in response.fields if n.lower() == b"upgrade"))
        if not chosen or any(p.split(b"/")[0] not in offered for p in chosen):
            # RFC 9110 §7.8: only to a protocol the client offered, and the 101 names it.
            self.upstreamFailed(
                Problem(502, "protocol", "The origin switched to a protocol not offered.")
            )
            return
        self.phase = UPGRADED
        self.code = 101
        self.env.metrics.upgrades.labels("ok").inc()
        downstream, upstream = self.downstream, self.upstream
        self.upstream = None
        self._unthrottle(upstream)
        downstream.sendHead(response)
        downstream.flush()
        self.env.splice(downstream.takeStream(), upstream.takeStream(), self._spliceEnded)

    def _spliceEnded(self, fromClient: int, fromOrigin: int) -> None:
        self.received += fromClient
        self.sentUpstream += fromClient
        self.sent += fromOrigin
        self.phase = DONE
        self.record()

    # --- endings ----------------------------------------------------------------------------

    def _dropUpstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            self._unthrottle(upstream)
            upstream.abort()

    def _unthrottle(self, upstream) -> None:
        """End the backpressure arrangement upstreamReady made."""
        self.downstream.throttle(None)
        length = self.request.length
        if length != NO_BODY and length != 0:
            upstream.throttle(None)

    def _answer(self, problem: Problem) -> None:
        """The proxy's own answer, in place of a response that will not come."""
        self.problem = problem
        self.code = problem.status
        if self.request.upgrade is not None:
            # An upgrade the origin never answered (dial failure, timeout, broken reply).
            self.env.metrics.upgrades.labels("error").inc()
        self.phase = DONE
        response, body = self.env.answer(problem, self.request.method == b"HEAD")
        self.contentType = response.contentType
        self.sent = len(body)
        self.answered = True
        self.record()
        downstream = self.downstream
        downstream.sendHead(response)
        if body:
            downstream.sendData(body)
        downstream.end()

    def _cut(self, problem: Problem) -> None:
        """Make a truncated response visible: the client sees it aborted, never complete."""
        self.problem = problem
        self.phase = DONE
        self.record()
        self.downstream.abort()

    def logURL(self) -> str:
        return self.request.url()

    def apiKey(self) -> tuple[str, bytes] | None:
        if self.mode != "mitm":
            return None
        return self.request.host, self.request.path


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip(b" \t").lower() for t in value.split(b",") if t.strip(b" \t")]
