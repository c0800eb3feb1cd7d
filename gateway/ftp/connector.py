"""
Where an ftp:// request's upstream side comes from: an FTP session of its own (never
pooled), or, when an [upstream] route applies to the FTP host, the upstream proxy, asked in
absolute form as for http:// (what Squid does with a parent).
"""

from __future__ import annotations

from ..message import Request
from .fetch import FTPFetch, FTPSettings
from .url import Credentials

__all__ = ["FTPConnector"]


class FTPConnector:
    """
    The connector of one ftp:// request: it holds the URL's credentials, which never travel
    in the request (nor reach a log).
    """

    def __init__(self, rt, credentials: Credentials | None) -> None:
        self.rt = rt
        self.credentials = credentials

    def open(self, request: Request, exchange, fresh: bool = False) -> None:
        rt = self.rt
        if rt.upstream.routeFor(request.host, request.port) is not None:
            rt.connector.open(request, exchange, fresh)
            return
        settings = FTPSettings.fromConfig(rt.config.proxy)
        fetch = FTPFetch(exchange, rt.dialer, settings, self.credentials, rt.reactor)
        exchange.upstreamReady(fetch, False)
