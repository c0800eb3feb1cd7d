# -*- test-case-name: tests.test_h2_machine -*-
"""
HTTP/2 frames (RFC 9113 §4 and §6): their types, flags, error and settings codes, the
9-byte frame header, and the frames the connection sends.

The codes are IntEnums for their names (logs, reprs); the hot paths compare plain ints
(the module constants), which an IntEnum member also is.
"""

from __future__ import annotations

import struct
from enum import IntEnum

__all__ = [
    "ACK",
    "CONTINUATION",
    "DATA",
    "END_HEADERS",
    "END_STREAM",
    "GOAWAY",
    "HEADER",
    "HEADERS",
    "MAX_WINDOW",
    "PADDED",
    "PING",
    "PREFACE",
    "PRIORITY",
    "PRIORITY_FLAG",
    "PUSH_PROMISE",
    "RST_STREAM",
    "SETTINGS",
    "WINDOW_UPDATE",
    "ErrorCode",
    "Setting",
    "frameHeader",
    "goawayFrame",
    "pingFrame",
    "resetFrame",
    "settingsFrame",
    "windowUpdateFrame",
]

#: What a client sends before its first frame (RFC 9113 §3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (§6).
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags: END_STREAM on DATA and HEADERS, ACK on SETTINGS and PING (the same bit).
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

#: The largest flow-control window (§6.9.1) and stream identifier.
MAX_WINDOW = 2**31 - 1


class ErrorCode(IntEnum):
    """RST_STREAM and GOAWAY error codes (§7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(IntEnum):
    """SETTINGS parameters (§6.5.2; 8: RFC 8441; 9: RFC 9218)."""

    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6
    ENABLE_CONNECT_PROTOCOL = 0x8
    NO_RFC7540_PRIORITIES = 0x9


#: The frame header: length (24 bits: a byte and 16 bits), type, flags, stream id (31 bits
#: and a reserved bit the reader masks off).
HEADER = struct.Struct(">BHBBL")
_pack = HEADER.pack
_U32 = struct.Struct(">L")
_U32x2 = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")


def frameHeader(length: int, kind: int, flags: int, streamId: int) -> bytes:
    """The 9 bytes that start a frame of C{length} payload bytes."""
    return _pack(length >> 16, length & 0xFFFF, kind, flags, streamId)


def settingsFrame(settings: dict[int, int], ack: bool = False) -> bytes:
    """A SETTINGS frame (with ACK: empty)."""
    if ack:
        return frameHeader(0, SETTINGS, ACK, 0)
    payload = b"".join(_SETTING.pack(code, value) for code, value in settings.items())
    return frameHeader(len(payload), SETTINGS, 0, 0) + payload


def windowUpdateFrame(streamId: int, increment: int) -> bytes:
    return frameHeader(4, WINDOW_UPDATE, 0, streamId) + _U32.pack(increment)


def resetFrame(streamId: int, code: int) -> bytes:
    return frameHeader(4, RST_STREAM, 0, streamId) + _U32.pack(code)


def pingFrame(data: bytes, ack: bool = False) -> bytes:
    return frameHeader(8, PING, ACK if ack else 0, 0) + data


def goawayFrame(lastStreamId: int, code: int, debug: bytes = b"") -> bytes:
    return frameHeader(8 + len(debug), GOAWAY, 0, 0) + _U32x2.pack(lastStreamId, code) + debug
