"""
ftp:// through the HTTP proxy: what C{ftp_proxy=http://proxy} clients (curl, Python's
urllib, R's download.file) send as C{GET ftp://host/path HTTP/1.1}.

- L{url}: the ftp:// URL (host, port, credentials, path, ;type=), pure;
- L{replies}: FTP replies as HTTP statuses, passive replies, content types, pure;
- L{fetch}: L{FTPFetch}, the upstream side of an exchange, on Twisted's FTP client.

Requests are counted with C{mode=MODE}.
"""

from .fetch import FTPFetch, FTPSettings
from .url import ANONYMOUS, Credentials, FTPPath, FTPTarget, parseFTPPath, parseFTPTarget

__all__ = [
    "ANONYMOUS",
    "MODE",
    "Credentials",
    "FTPFetch",
    "FTPPath",
    "FTPSettings",
    "FTPTarget",
    "parseFTPPath",
    "parseFTPTarget",
]

#: The mode label of ftp:// requests in proxygate_requests_total and the access log.
MODE = "ftp"
