"""
HTTP/2 inside intercepted tunnels, on the h2 library (python-hyper).

- headers.py     h2 header blocks <-> the wire-neutral heads of gateway.message
- stream.py      one stream as an exchange's side (Downstream or Upstream): flow control
- connection.py  the connection protocol in both roles: batching, limits, timers, GOAWAY

Loaded only when a tunnel is intercepted with [mitm] http2 on.
"""
