"""The echo backends of the inbound gateway's tests, exercised directly (no proxygate)."""

from __future__ import annotations

import hashlib
import socket

import pytest
import requests
import websocket

from tests.support import payloadChunks, payloadDigest
from tests.support.backends import EchoBackend, websocketAccept


@pytest.fixture
def backend():
    b = EchoBackend("one")
    yield b
    b.stop()


def test_echoesMethodPathAndEveryHeader(backend: EchoBackend) -> None:
    r = requests.post(
        backend.url + "/a/b?c=1",
        data=b"hello",
        headers={"X-Forwarded-User": "alice", "x-lower": "v"},
        timeout=5,
    )
    doc = r.json()
    assert (doc["backend"], doc["method"], doc["path"], doc["version"]) == (
        "one",
        "POST",
        "/a/b?c=1",
        "HTTP/1.1",
    )
    assert ["X-Forwarded-User", "alice"] in doc["headers"]
    assert ["x-lower", "v"] in doc["headers"]  # spelling kept
    assert doc["body_length"] == 5
    assert doc["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert backend.requests[-1]["path"] == "/a/b?c=1"


def test_answersWithChosenHeaders(backend: EchoBackend) -> None:
    r = requests.get(
        backend.url + "/",
        headers={
            "X-Echo-Status": "302",
            "X-Echo-Location": backend.url + "/login",
            "X-Echo-Refresh": "5; url=/x",
            "X-Echo-Content-Location": "/c",
            "X-Echo-Set-Cookie": "s=1; Path=/",
        },
        allow_redirects=False,
        timeout=5,
    )
    assert r.status_code == 302
    assert r.headers["Location"] == backend.url + "/login"
    assert r.headers["Refresh"] == "5; url=/x"
    assert r.headers["Content-Location"] == "/c"
    assert r.headers["Set-Cookie"] == "s=1; Path=/"


def test_healthToggles(backend: EchoBackend) -> None:
    assert requests.get(backend.url + "/health", timeout=5).status_code == 200
    backend.healthy = False
    assert requests.get(backend.url + "/health", timeout=5).status_code == 503


def test_stopRefusesAndStartComesBackOnTheSamePort(backend: EchoBackend) -> None:
    port = backend.port
    session = requests.Session()
    assert session.get(backend.url + "/", timeout=5).ok  # a kept-alive connection
    backend.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(requests.ConnectionError):
        session.get(backend.url + "/", timeout=5)
    backend.start()
    assert backend.port == port
    assert requests.get(backend.url + "/", timeout=5).json()["backend"] == "one"


def test_websocketEcho(backend: EchoBackend) -> None:
    ws = websocket.create_connection(backend.url.replace("http", "ws") + "/ws", timeout=5)
    try:
        ws.send("hello")
        assert ws.recv() == "hello"
        big = bytes(range(256)) * 1000
        ws.send_binary(big)
        assert ws.recv() == big
        ws.ping(b"p")
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"p")
    finally:
        ws.close()
    assert backend.websockets == 1
    assert websocketAccept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.slow
def test_uploadOf200MBStreams(backend: EchoBackend) -> None:
    size = 200 * 1000 * 1000
    r = requests.post(
        backend.url + "/upload",
        data=payloadChunks(size, 1 << 20),  # chunked: a generator has no length
        timeout=60,
    )
    assert r.json() == {"backend": "one", "bytes": size, "sha256": payloadDigest(size)}
    small = 3 * (1 << 20) + 7
    r = requests.put(
        backend.url + "/upload",
        data=b"".join(payloadChunks(small)),
        timeout=60,
    )
    assert r.json()["bytes"] == small and r.json()["sha256"] == payloadDigest(small)
