# -*- test-case-name: tests.test_h2 -*-
"""
Origin HTTP/2 connections, shared: every exchange going to the same origin opens a stream on
one of them, as long as it takes more (L{H2ClientProtocol.available}: its SETTINGS limit, no
GOAWAY). The connector asks L{H2Pool.get} before dialling, and L{H2Pool.add}s what it dialled
when the origin chose h2.

Keys are the connector's (scheme, host, port, route), the same as the HTTP/1.1 pool's, in a
separate table: an origin that chose h2 for one client's ALPN offer may get an http/1.1-only
offer from the next client, whose requests go to the HTTP/1.1 pool. A connection leaves the
table when it is lost; an idle one closes by its own idle timeout (GOAWAY) and leaves then.
"""

from __future__ import annotations

from .connection import H2ClientProtocol

__all__ = ["H2Pool"]


class H2Pool:
    """
    Origin h2 connections by key, oldest first (streams gather on few connections).

    @ivar maxPerKey: connections kept per key: beyond it, L{add} drains the newcomer once
        its streams are done (an origin allowing few streams may need several).
    """

    def __init__(self, maxPerKey: int = 8) -> None:
        self.maxPerKey = maxPerKey
        self._conns: dict[tuple, list[H2ClientProtocol]] = {}

    def get(self, key: tuple) -> H2ClientProtocol | None:
        """A connection to C{key} that takes another stream now, if there is one."""
        for conn in self._conns.get(key, ()):
            if conn.available:
                return conn
        return None

    def add(self, key: tuple, conn: H2ClientProtocol) -> None:
        """Share C{conn} (connected, ALPN h2) for C{key} until it is lost."""
        conns = self._conns.setdefault(key, [])
        if len(conns) >= self.maxPerKey:
            conn.drain()  # serves what it was dialled for, then goes
            return
        conns.append(conn)
        conn.poolKey = key
        conn.onLost = self._lost

    def _lost(self, conn: H2ClientProtocol) -> None:
        key = getattr(conn, "poolKey", None)
        conns = self._conns.get(key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[key]

    def __len__(self) -> int:
        return sum(len(conns) for conns in self._conns.values())

    def closeAll(self) -> None:
        """Shutdown: every connection says GOAWAY, finishes its streams and closes."""
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.drain()
