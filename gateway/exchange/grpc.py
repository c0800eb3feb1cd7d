"""
gRPC calls as the metrics see them: a call is an HTTP/2 request whose content-type is
application/grpc (or +proto, +json, -web...), its C{api} label is the method path
(C{/pkg.Service/Method}, never folded: L{gateway.apinames.grpcMethod}), and its outcome is
the grpc-status the origin sent: in the trailers, or in the head of a trailers-only response
(a call that fails before any message). Pure: no Twisted.
"""

from __future__ import annotations

from ..apinames import grpcMethod, normaliseAPI
from ..message import Fields, Response
from .exchange import Exchange

__all__ = ["GRPCExchange", "isGRPC"]

_GRPC = b"application/grpc"


def isGRPC(fields: Fields) -> bool:
    """Whether a request with these fields is a gRPC call (by its content-type)."""
    for name, value in fields:
        if len(name) == 12 and name.lower() == b"content-type":
            value = value.lower()
            return value[:16] == _GRPC and value[16:17] in (b"", b"+", b";", b"-")
    return False


def _status(fields: Fields) -> bytes | None:
    for name, value in fields:
        if len(name) == 11 and name.lower() == b"grpc-status":
            return value.strip()
    return None


class GRPCExchange(Exchange):
    """An exchange carrying one gRPC call: it keeps the call's grpc-status for the metrics."""

    __slots__ = ()

    def responseHead(self, response: Response) -> None:
        if response.status >= 200:
            status = _status(response.fields)  # a trailers-only response says it here
            if status is not None:
                self.grpcStatus = status
        super().responseHead(response)

    def responseEnd(self, trailers: Fields | None = None) -> None:
        if trailers:
            status = _status(trailers)
            if status is not None:
                self.grpcStatus = status
        super().responseEnd(trailers)

    def apiName(self, path: bytes) -> str:
        return grpcMethod(path) or normaliseAPI(path)
