"""
HTTP/2 inside intercepted tunnels, on proxygate's own sans-IO codec (RFC 9113, RFC 7541).

The codec, pure and without I/O (python-hyper's h2 is the tests' reference peer only):
- frames.py      frame types, flags, codes, the 9-byte header, the frames this side sends
- hpack.py       HPACK encoder and decoder; huffman.py its Huffman code
- fields.py      the RFC 9113 §8.2-8.3 checks of a received header block, taking it apart
- events.py      what the machine reports; machine.py one connection's state, either role

Its Twisted side:
- headers.py     decoded header blocks <-> the wire-neutral heads of gateway.message
- stream.py      one stream as an exchange's side (Downstream or Upstream): flow control
- connection.py  the connection protocol in both roles: batching, limits, timers, GOAWAY

Loaded only when a tunnel is intercepted with [mitm] http2 on.
"""
