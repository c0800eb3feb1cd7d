"""
Re-capture the ClientHello fixtures of tests/test_clienthello.py from real clients:
    .venv/bin/python tests/data/clienthello/capture.py [NAME...]   (default: all of them)
Each client connects to a loopback listener that records the bytes until the hello is
complete, then closes (the clients' handshakes fail, which is expected). The file names say
who sent what; the test states what each must parse to.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent.parent))

from gateway.tls.clienthello import ClientHelloReader  # noqa: E402


def capture(name: str, run) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        conn.settimeout(10)
        reader, data = ClientHelloReader(), b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
            hello = reader.feed(chunk)
            if hello is not None:
                got.append(data[: hello.size])
                break
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    run(port)
    thread.join(15)
    server.close()
    (HERE / f"{name}.bin").write_bytes(got[0])
    print(name, len(got[0]))


def command(*argv: str):
    return lambda port: subprocess.run(
        [a.replace("PORT", str(port)) for a in argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=15,
    )


def python(alpn, serverName):
    def run(port: int) -> None:
        ctx = ssl.create_default_context()
        if alpn:
            ctx.set_alpn_protocols(alpn)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                ctx.wrap_socket(sock, server_hostname=serverName)
        except (OSError, ssl.SSLError):
            pass

    return run


def grpc(port: int) -> None:
    import grpc as grpcio

    channel = grpcio.secure_channel(
        f"127.0.0.1:{port}",
        grpcio.ssl_channel_credentials(),
        options=[("grpc.ssl_target_name_override", "grpc.example.test")],
    )
    try:
        grpcio.channel_ready_future(channel).result(timeout=3)
    except grpcio.FutureTimeoutError:
        pass
    channel.close()


RESOLVE = "example.test:PORT:127.0.0.1"
CLIENTS: dict = {}


def CLIENT(name: str, run) -> None:
    CLIENTS[name] = run


CLIENT(
    "curl-h2", command("curl", "-sk", "--http2", "--resolve", RESOLVE, "https://example.test:PORT/")
)
CLIENT(
    "curl-http11",
    command("curl", "-sk", "--http1.1", "--resolve", RESOLVE, "https://example.test:PORT/"),
)
CLIENT(
    "openssl-alpn",
    command(
        "openssl",
        "s_client",
        "-connect",
        "127.0.0.1:PORT",
        "-servername",
        "example.test",
        "-alpn",
        "h2,http/1.1",
    ),
)
CLIENT(
    "openssl-bare",
    command("openssl", "s_client", "-connect", "127.0.0.1:PORT", "-noservername", "-tls1_2"),
)
CLIENT(
    "openssl-split",
    command(
        "openssl",
        "s_client",
        "-connect",
        "127.0.0.1:PORT",
        "-servername",
        "split.example.test",
        "-alpn",
        "h2,http/1.1," + ",".join(f"x-filler-{i:03d}" for i in range(40)),
        "-max_send_frag",
        "512",
    ),
)
CLIENT("python-h2", python(["h2", "http/1.1"], "example.test"))
CLIENT("python-noalpn", python(None, "example.test"))
CLIENT("grpcio", grpc)

if __name__ == "__main__":
    # Arguments: the fixtures to re-capture (default: all).
    for name in sys.argv[1:] or list(CLIENTS):
        try:
            capture(name, CLIENTS[name])
        except ImportError as e:
            print(f"{name}: {e}")
