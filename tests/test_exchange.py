"""
The sans-IO exchange, playbook style: events in, the exact actions on its two sides and its
environment out (tests/playbook.py). No socket, no reactor: each test runs in milliseconds.
"""

from __future__ import annotations

import pytest

from gateway.exchange.exchange import MAX_INTERIM, Exchange
from gateway.exchange.problems import Problem
from gateway.message import NO_BODY, UNKNOWN
from tests.support.playbook import (
    PlaybookEnv,
    RecordingDownstream,
    RecordingUpstream,
    request,
    response,
)

VIA = [(b"Via", b"1.1 proxygate")]


def started(env: PlaybookEnv, req=None, *, reused: bool = False, mode: str = "forward"):
    """An exchange whose upstream side is attached; the actions so far are dropped."""
    down = RecordingDownstream(env.actions)
    exchange = Exchange(env, down, req or request(), mode=mode, user="alice")
    exchange.begin()
    up = RecordingUpstream(env.actions)
    exchange.upstreamReady(up, reused)
    env.take()
    return exchange, down, up


def test_aGetGoesUpAndItsResponseComesBack() -> None:
    env = PlaybookEnv()
    down = RecordingDownstream(env.actions)
    exchange = Exchange(env, down, request(), mode="forward", user="alice")
    exchange.begin()
    assert env.take() == [("open", "example.com", 80, False)]

    up = RecordingUpstream(env.actions)
    exchange.upstreamReady(up, False)
    assert up.exchange is exchange
    # A GET has no body to brake: only the response direction is throttled.
    assert env.take() == [
        ("down.throttle", "up"),
        ("up.sendHead", b"GET", b"/x", VIA),
        ("up.flush",),
    ]

    exchange.responseHead(response())
    exchange.responseData(b"ok")
    exchange.responseFlush()
    exchange.responseEnd()
    assert env.take() == [
        ("down.sendHead", 200, [(b"Server", b"o")], VIA),
        ("down.sendData", b"ok"),
        ("down.flush",),
        ("down.throttle", None),
        ("up.release", True),
        ("down.end", None),
    ]
    (record,) = env.accessLog.records
    assert (record.code, record.size, record.url, record.user, record.action) == (
        200,
        2,
        "http://example.com/x",
        "alice",
        "TCP_MISS",
    )
    assert record.hierarchy == "HIER_DIRECT/192.0.2.1"
    assert env.requests() == {("forward", b"GET", 200): 1}


def test_forwardedForIsAddedAfterVia() -> None:
    env = PlaybookEnv(forwardedFor=True)
    exchange, _down, _up = started(env)
    assert exchange.request.proxyFields == [*VIA, (b"X-Forwarded-For", b"203.0.113.7")]


def test_noViaWhenThePseudonymIsEmpty() -> None:
    env = PlaybookEnv(via=b"")
    exchange, _down, _up = started(env)
    exchange.responseHead(response())
    assert env.take()[0] == ("down.sendHead", 200, [(b"Server", b"o")], [])


def test_bodyWhileDiallingIsHeldThenSentInOrder() -> None:
    env = PlaybookEnv()
    down = RecordingDownstream(env.actions)
    exchange = Exchange(env, down, request(b"POST", length=UNKNOWN), mode="forward")
    exchange.begin()
    exchange.requestData(b"a")
    exchange.requestData(b"b")
    exchange.requestEnd([(b"X-T", b"1")])
    assert env.take() == [
        ("open", "example.com", 80, False),
        ("down.pause",),
        ("down.pause",),
    ]
    up = RecordingUpstream(env.actions)
    exchange.upstreamReady(up, False)
    assert env.take() == [
        ("down.throttle", "up"),
        ("up.throttle", "down"),
        ("up.sendHead", b"POST", b"/x", VIA),
        ("up.sendData", b"a"),
        ("up.sendData", b"b"),
        ("up.end", [(b"X-T", b"1")]),
        ("up.flush",),
        ("down.resume",),
    ]
    assert (exchange.received, exchange.sentUpstream) == (2, 2)


def test_aBodyBrakesBothWaysUntilTheEnd() -> None:
    env = PlaybookEnv()
    down = RecordingDownstream(env.actions)
    exchange = Exchange(env, down, request(b"PUT", length=3), mode="forward")
    exchange.begin()
    exchange.upstreamReady(RecordingUpstream(env.actions), False)
    assert env.take()[1:3] == [("down.throttle", "up"), ("up.throttle", "down")]
    exchange.requestData(b"abc")
    exchange.requestEnd()
    exchange.responseHead(response(201, length=0))
    exchange.responseEnd()
    assert env.take()[-4:] == [
        ("down.throttle", None),
        ("up.throttle", None),
        ("up.release", True),
        ("down.end", None),
    ]


def test_bodyAfterConnectingGoesStraightUp() -> None:
    env = PlaybookEnv()
    exchange, _down, _up = started(env, request(b"PUT", length=3))
    exchange.requestData(b"abc")
    exchange.requestEnd()
    assert env.take() == [("up.sendData", b"abc"), ("up.end", None)]


def test_informationalResponsesPassAndAreBounded() -> None:
    env = PlaybookEnv()
    exchange, _down, _up = started(env)
    for _ in range(MAX_INTERIM):
        exchange.responseHead(response(102, length=NO_BODY))
    assert len(env.take()) == MAX_INTERIM
    exchange.responseHead(response(102, length=NO_BODY))
    actions = env.take()
    assert ("up.abort",) in actions
    assert [a[:2] for a in actions if a[0] == "down.sendHead"] == [("down.sendHead", 502)]
    assert actions[-1] == ("down.end", None)
    assert exchange.problem.code == "protocol"
    assert env.metrics.upstreamErrors.labels("reset")._value.get() == 1


def test_upstreamUnavailableIsAnsweredWithItsProblem() -> None:
    env = PlaybookEnv()
    down = RecordingDownstream(env.actions)
    exchange = Exchange(env, down, request(), mode="forward")
    exchange.begin()
    env.take()
    exchange.upstreamUnavailable(Problem(502, "dns", "cannot resolve host 'example.com'"))
    actions = env.take()
    assert [a[0] for a in actions] == ["down.sendHead", "down.sendData", "down.end"]
    status, fields = actions[0][1], dict(actions[0][2])
    assert status == 502
    assert fields[b"Proxy-Status"] == b"proxygate; error=dns_error"
    assert actions[1][1] == b"cannot resolve host 'example.com'\n"
    assert env.metrics.upstreamErrors.labels("dns")._value.get() == 1
    (record,) = env.accessLog.records
    assert (record.code, record.reason, record.size) == (502, "dns", len(actions[1][1]))


def test_aHeadRequestGetsNoBodyInAnAnswer() -> None:
    env = PlaybookEnv()
    down = RecordingDownstream(env.actions)
    exchange = Exchange(env, down, request(b"HEAD"), mode="forward")
    exchange.begin()
    env.take()
    exchange.upstreamUnavailable(Problem(504, "timeout", "too slow"))
    assert [a[0] for a in env.take()] == ["down.sendHead", "down.end"]


def test_aDeadPooledConnectionIsRetriedOnceOnAFreshOne() -> None:
    env = PlaybookEnv()
    exchange, _down, _up = started(env, reused=True)
    exchange.upstreamLost(None)
    assert env.take() == [("down.throttle", None), ("open", "example.com", 80, True)]
    up2 = RecordingUpstream(env.actions, "up2")
    exchange.upstreamReady(up2, True)
    env.take()
    exchange.upstreamLost(None)  # twice: no more retries
    actions = env.take()
    assert ("open", "example.com", 80, True) not in actions
    assert actions[1][:2] == ("down.sendHead", 502)
    assert exchange.problem.code == "incomplete"


@pytest.mark.parametrize(
    "req, reused",
    [
        (request(b"POST", length=3), True),  # not idempotent, has a body
        (request(b"PUT", length=3), True),  # idempotent, but a body was sent
        (request(), False),  # a new connection: the origin really closed
    ],
)
def test_noRetryWhenItCouldRepeatSomething(req, reused) -> None:
    env = PlaybookEnv()
    exchange, _down, _up = started(env, req, reused=reused)
    exchange.upstreamLost(None)
    assert not any(a[0] == "open" for a in env.take())
    assert exchange.code == 502


def test_theOriginClosingMidResponseIsAVisibleCut() -> None:
    env = PlaybookEnv()
    exchange, _down, _up = started(env)
    exchange.responseHead(response(length=10))
    exchange.responseData(b"12345")
    env.take()
    exchange.upstreamLost(None)
    assert env.take() == [("down.throttle", None), ("down.abort",)]
    (record,) = env.accessLog.records
    assert (record.code, record.size, record.reason) == (200, 5, "incomplete")


def test_aTLSFailureIsTheProblemTheSideReports() -> None:
    env = PlaybookEnv()
    exchange, _down, _up = started(env, reused=True)
    exchange.upstreamLost(Problem(502, "tls", "TLS to the origin example.com failed: x"))
    actions = env.take()
    assert not any(a[0] == "open" for a in actions), "a TLS failure is never retried"
    assert dict(actions[1][2])[b"Proxy-Status"] == b"proxygate; error=tls_certificate_error"


def test_theClientLeavingWhileDiallingReleasesTheSideWhenItComes() -> None:
    env = PlaybookEnv()
    down = RecordingDownstream(env.actions)
    exchange = Exchange(env, down, request(), mode="forward")
    exchange.begin()
    exchange.downstreamLost()
    up = RecordingUpstream(env.actions)
    exchange.upstreamReady(up, False)
    assert env.take()[-1] == ("up.release", False)
    (record,) = env.accessLog.records
    assert record.action == "TCP_MISS_ABORTED" and record.reason == "client_gone"


def test_theClientLeavingMidExchangeAbortsTheUpstream() -> None:
    env = PlaybookEnv()
    exchange, _down, _up = started(env)
    exchange.downstreamLost()
    assert env.take() == [("down.throttle", None), ("up.abort",)]
    exchange.responseHead(response())  # late events are ignored
    assert env.take() == []


def test_timeoutBeforeTheResponseIs504AndAfterIsACut() -> None:
    env = PlaybookEnv()
    exchange, _down, _up = started(env)
    exchange.timedOut()
    actions = env.take()
    assert ("up.abort",) in actions and actions[2][:2] == ("down.sendHead", 504)
    assert env.metrics.upstreamErrors.labels("timeout")._value.get() == 1

    env = PlaybookEnv()
    exchange, _down, _up = started(env)
    exchange.responseHead(response(length=5))
    env.take()
    exchange.timedOut()
    assert env.take()[-1] == ("down.abort",)


def test_aResponseBeforeTheBodyEndsKeepsTheConnectionOutOfThePool() -> None:
    env = PlaybookEnv()
    exchange, _down, _up = started(env, request(b"POST", length=100))
    exchange.requestData(b"x" * 10)
    exchange.responseHead(response(413, length=0))
    exchange.responseEnd()
    assert ("up.release", False) in env.take()


def test_anUpgradeSplicesBothSides() -> None:
    env = PlaybookEnv()
    req = request(upgrade=b"websocket")
    exchange, _down, _up = started(env, req)
    upgraded = response(101, length=NO_BODY, fields=[(b"Upgrade", b"websocket")])
    exchange.responseHead(upgraded)
    assert env.take() == [
        ("down.throttle", None),
        ("down.sendHead", 101, [(b"Upgrade", b"websocket")], VIA),
        ("down.flush",),
        ("down.takeStream",),
        ("up.takeStream",),
        ("splice", "down-stream", "up-stream"),
    ]
    assert env.metrics.upgrades.labels("ok")._value.get() == 1
    env.spliceEnded(7, 9)
    (record,) = env.accessLog.records
    assert (record.code, record.size) == (101, 9)


@pytest.mark.parametrize(
    "offer, chosen",
    [(None, b"websocket"), (b"websocket", b"h2c"), (b"websocket", None)],
)
def test_anUpgradeNobodyAskedForIsRefused(offer, chosen) -> None:
    env = PlaybookEnv()
    exchange, _down, _up = started(env, request(upgrade=offer))
    fields = [(b"Upgrade", chosen)] if chosen else []
    exchange.responseHead(response(101, length=NO_BODY, fields=fields))
    actions = env.take()
    assert ("up.abort",) in actions
    assert any(a[:2] == ("down.sendHead", 502) for a in actions)
    assert not any(a[0] == "splice" for a in actions)


def test_aRefusedUpgradeIsCounted() -> None:
    env = PlaybookEnv()
    exchange, _down, _up = started(env, request(upgrade=b"websocket"))
    exchange.responseHead(response(200))
    assert env.metrics.upgrades.labels("refused")._value.get() == 1


def test_decryptedRequestsCountPerAPI() -> None:
    env = PlaybookEnv()
    exchange, _down, _up = started(env, request(path=b"/v1/users/12345?x=1"), mode="mitm")
    exchange.responseHead(response())
    exchange.responseEnd()
    assert list(env.metrics.live.apis) == [("example.com", "/v1/users/:id")]
    assert env.requests() == {("mitm", b"GET", 200): 1}


def test_aStreamTheOriginRefusedIsRetriedOnceWhateverItsMethod() -> None:
    """RFC 9113 §8.7: a refused HTTP/2 stream was not processed; a bodyless POST is safe too."""
    env = PlaybookEnv()
    exchange, _down, _up = started(env, request(b"POST", length=0))
    refused = Problem(502, "stream_refused", "The origin refused the stream.")
    exchange.upstreamLost(refused)
    assert env.take() == [("down.throttle", None), ("open", "example.com", 80, True)]
    exchange.upstreamReady(RecordingUpstream(env.actions, "up2"), False)
    env.take()
    exchange.upstreamLost(refused)  # once only
    actions = env.take()
    assert actions[1][:2] == ("down.sendHead", 502)
    assert exchange.problem.code == "stream_refused"


def test_aRefusedStreamWithABodyIsNotRetried() -> None:
    """The body went up and cannot be sent again: the client hears 502."""
    env = PlaybookEnv()
    exchange, _down, _up = started(env, request(b"PUT", length=3))
    exchange.upstreamLost(Problem(502, "stream_refused", "The origin refused the stream."))
    assert not any(a[0] == "open" for a in env.take())
    assert exchange.code == 502


def test_requestFlushReachesTheUpstream() -> None:
    """An HTTP/2 downstream ends each batch of request events: the upstream sends them then."""
    env = PlaybookEnv()
    exchange, _down, _up = started(env, request(b"POST", length=UNKNOWN))
    exchange.requestData(b"abc")
    exchange.requestFlush()
    assert env.take() == [("up.sendData", b"abc"), ("up.flush",)]


def grpcCall(env: PlaybookEnv, path: bytes = b"/pkg.v1.Service/GetThing"):
    from gateway.exchange.grpc import GRPCExchange

    down = RecordingDownstream(env.actions)
    req = request(b"POST", path, length=UNKNOWN, fields=[(b"content-type", b"application/grpc")])
    exchange = GRPCExchange(env, down, req, mode="mitm", user=None)
    exchange.begin()
    exchange.upstreamReady(RecordingUpstream(env.actions), False)
    return exchange


def test_aGRPCCallCountsPerMethodWithItsTrailerStatus() -> None:
    env = PlaybookEnv()
    exchange = grpcCall(env)
    exchange.responseHead(response(length=UNKNOWN, fields=[(b"content-type", b"application/grpc")]))
    exchange.responseData(b"\x00\x00\x00\x00\x00")
    exchange.responseEnd([(b"grpc-status", b"0"), (b"grpc-message", b"")])
    figures = env.metrics.live.apis[("example.com", "/pkg.v1.Service/GetThing")]
    assert figures.grpc == {"0": 1}
    assert figures.codes == {(b"POST", 200): 1}


def test_aTrailersOnlyGRPCAnswerCountsItsHeadStatus() -> None:
    env = PlaybookEnv()
    exchange = grpcCall(env, b"/pkg.Service/Missing?x")
    exchange.responseHead(response(length=0, fields=[(b"grpc-status", b"12")]))
    exchange.responseEnd()
    assert env.metrics.live.apis[("example.com", "/pkg.Service/Missing")].grpc == {"12": 1}


@pytest.mark.parametrize(
    "path, api",
    [
        (b"/pkg.Service/Method", "/pkg.Service/Method"),  # never folded
        (b"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Check"),
        (b"/a/b/c", "/a/b/c"),  # not a method path: folded as any path
        (b"/v1/users/12345", "/v1/users/:id"),
    ],
)
def test_grpcMethodPathsAreKeptWhole(path, api) -> None:
    env = PlaybookEnv()
    exchange = grpcCall(env, path)
    exchange.responseHead(response(length=0, fields=[(b"grpc-status", b"x7")]))
    exchange.responseEnd()
    assert list(env.metrics.live.apis) == [("example.com", api)]
    assert env.metrics.live.apis[("example.com", api)].grpc == {"other": 1}


def test_isGRPC() -> None:
    from gateway.exchange.grpc import isGRPC

    assert isGRPC([(b"content-type", b"application/grpc")])
    assert isGRPC([(b"Content-Type", b"application/grpc+proto")])
    assert isGRPC([(b"content-type", b"application/grpc-web-text")])
    assert not isGRPC([(b"content-type", b"application/grpcx")])
    assert not isGRPC([(b"content-type", b"application/json")])
    assert not isGRPC([])
