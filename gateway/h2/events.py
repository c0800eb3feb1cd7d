# -*- test-case-name: tests.test_h2_machine -*-
"""
What L{gateway.h2.machine.H2Machine.receiveData} reports: one light object per thing that
happened, in the order the frames said it (slots, no behaviour).

END_STREAM is a flag of the event that carried it (C{endStream}), not an event of its own.
A header block the RFC forbids (L{gateway.h2.fields.Malformed}) still arrives, with
C{error} saying why and C{head} None: what to do with it (answer 400, reset the stream) is
the receiver's; the connection is unaffected.
"""

from __future__ import annotations

__all__ = [
    "ConnectionTerminated",
    "DataReceived",
    "Event",
    "InformationalResponseReceived",
    "PingAcknowledged",
    "RemoteSettingsChanged",
    "RequestReceived",
    "ResponseReceived",
    "SettingsAcknowledged",
    "StreamReset",
    "TrailersReceived",
    "WindowUpdated",
]


class Event:
    __slots__ = ()

    def __repr__(self) -> str:
        names = [name for kind in type(self).__mro__ for name in getattr(kind, "__slots__", ())]
        values = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{type(self).__name__}({values})"


class _HeaderBlock(Event):
    """
    A header block on C{streamId}: C{headers} as decoded, C{size} its header list size
    (RFC 9113 §6.5.2), C{head} what L{gateway.h2.fields} made of it.
    """

    __slots__ = ("endStream", "error", "head", "headers", "size", "streamId")

    def __init__(self, streamId, headers, size, head, error, endStream) -> None:
        self.streamId = streamId
        self.headers = headers
        self.size = size
        self.head = head
        self.error = error
        self.endStream = endStream


class RequestReceived(_HeaderBlock):
    """A stream opened by a request; C{head} is L{gateway.h2.fields.requestHead}'s tuple."""

    __slots__ = ()


class ResponseReceived(_HeaderBlock):
    """The final response; C{head} is L{gateway.h2.fields.responseHead}'s tuple."""

    __slots__ = ()


class InformationalResponseReceived(_HeaderBlock):
    """A 1xx response (C{head} as L{ResponseReceived}'s); the final one follows."""

    __slots__ = ()


class TrailersReceived(_HeaderBlock):
    """Trailers (they end the stream); C{head} is their fields."""

    __slots__ = ()


class DataReceived(Event):
    """
    DATA on C{streamId}. C{flowLength} is what it took of the receive windows (padding
    included): give it back with C{acknowledgeReceivedData} once the data is consumed.
    """

    __slots__ = ("data", "endStream", "flowLength", "streamId")

    def __init__(self, streamId: int, data: bytes, flowLength: int, endStream: bool) -> None:
        self.streamId = streamId
        self.data = data
        self.flowLength = flowLength
        self.endStream = endStream


class StreamReset(Event):
    """
    The stream is over, unfinished: the peer sent RST_STREAM (C{remote}), or this side did
    for a stream error the peer caused (the frame is queued already).
    """

    __slots__ = ("errorCode", "remote", "streamId")

    def __init__(self, streamId: int, errorCode: int, remote: bool) -> None:
        self.streamId = streamId
        self.errorCode = errorCode
        self.remote = remote


class WindowUpdated(Event):
    """The peer opened the send window of C{streamId} (0: the connection) by C{delta}."""

    __slots__ = ("delta", "streamId")

    def __init__(self, streamId: int, delta: int) -> None:
        self.streamId = streamId
        self.delta = delta


class RemoteSettingsChanged(Event):
    """The peer's SETTINGS (acknowledged already): C{changed} maps codes to new values."""

    __slots__ = ("changed",)

    def __init__(self, changed: dict[int, int]) -> None:
        self.changed = changed


class SettingsAcknowledged(Event):
    """The peer applied this side's SETTINGS."""

    __slots__ = ()


class PingAcknowledged(Event):
    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class ConnectionTerminated(Event):
    """
    GOAWAY from the peer: no new streams; the ones up to C{lastStreamId} (of this side's)
    may still finish, the ones above it were never processed.
    """

    __slots__ = ("debug", "errorCode", "lastStreamId")

    def __init__(self, errorCode: int, lastStreamId: int, debug: bytes) -> None:
        self.errorCode = errorCode
        self.lastStreamId = lastStreamId
        self.debug = debug
