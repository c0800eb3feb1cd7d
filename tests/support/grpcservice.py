"""
A gRPC service and client for the HTTP/2 tests, on grpcio with TLS from a test CA, without
generated code: the methods are registered with grpc's generic handlers and carry raw bytes.

Service C{proxygate.test.Echo} (so the API label is C{/proxygate.test.Echo/<Method>}):
 - C{Unary}: the request back, with trailing metadata C{x-trailer: yes};
 - C{Count}: server streaming: the request is a decimal count N, the answers are
   C{b"message i"} for i in 0..N-1;
 - C{Big}: a 3 MB answer (L{BIG} bytes of conftest's payload), whatever the request;
 - C{Fail}: aborts with NOT_FOUND and the message "no such thing".

L{GRPCServer} serves it on 127.0.0.1 with OriginPKI's certificate for C{localhost};
L{channel} makes a client channel that trusts a given CA and, for the later end-to-end tests,
goes through an HTTP proxy (CONNECT) when one is given: that is how a gRPC client sits behind
an intercepting proxygate (it must then trust proxygate's CA).
"""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc

from tests.support import payload

__all__ = ["BIG", "SERVICE", "GRPCServer", "channel", "methods"]

SERVICE = "proxygate.test.Echo"
BIG = 3 * 1024 * 1024
#: Messages up to this size both ways (grpc's default receive limit is 4 MiB).
MAX_MESSAGE = 8 * 1024 * 1024


def _unary(request: bytes, context) -> bytes:
    context.set_trailing_metadata((("x-trailer", "yes"),))
    return request


def _count(request: bytes, context):
    for i in range(int(request or b"0")):
        yield b"message %d" % i


def _big(request: bytes, context) -> bytes:
    return payload(BIG)


def _fail(request: bytes, context) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


_HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(_unary),
    "Count": grpc.unary_stream_rpc_method_handler(_count),
    "Big": grpc.unary_unary_rpc_method_handler(_big),
    "Fail": grpc.unary_unary_rpc_method_handler(_fail),
}

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


class GRPCServer:
    """The service over TLS on 127.0.0.1 (a free port), in grpc's own threads."""

    def __init__(self, certFile: Path, keyFile: Path) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=_OPTIONS)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, _HANDLERS),)
        )
        credentials = grpc.ssl_server_credentials([(keyFile.read_bytes(), certFile.read_bytes())])
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def close(self) -> None:
        self.server.stop(grace=None)


def channel(target: str, caFile: Path, proxy: str | None = None) -> grpc.Channel:
    """
    A TLS channel to C{target} trusting only C{caFile}; through C{proxy}
    (C{http://127.0.0.1:3128}) with CONNECT when given. grpc reads the proxy from the
    C{grpc.http_proxy} channel argument here (the same as the https_proxy environment
    variable, without touching this process's environment); C{localhost} targets are not
    exempt from it as long as no_proxy does not name them.
    """
    options = list(_OPTIONS)
    if proxy is not None:
        options.append(("grpc.http_proxy", proxy))
    else:
        options.append(("grpc.enable_http_proxy", 0))
    credentials = grpc.ssl_channel_credentials(root_certificates=caFile.read_bytes())
    return grpc.secure_channel(target, credentials, options=options)


def methods(ch: grpc.Channel) -> dict:
    """Callables for the service's methods on C{ch} (bytes in, bytes out)."""
    return {
        "Unary": ch.unary_unary(f"/{SERVICE}/Unary"),
        "Count": ch.unary_stream(f"/{SERVICE}/Count"),
        "Big": ch.unary_unary(f"/{SERVICE}/Big"),
        "Fail": ch.unary_unary(f"/{SERVICE}/Fail"),
    }
