"""
The Twisted side of HTTP/1.1 and of the paths between the wires: protocols that own sockets,
each a thin adapter around the sans-IO layers (gateway/http1/, gateway/exchange/).

- client.py     the client connection: heads, limits, auth, dispatch; a downstream side
- origin.py     origin connections (an upstream side) and their keep-alive pool
- connector.py  where an exchange's upstream side comes from: pool, dial, chain
- connect.py    CONNECT: check, dial, 200, splice; an intercepted tunnel's first bytes
- tunnel.py     connections handed over to raw bytes (Stream) and the Splice of two
- mitm.py       TLS interception: which tunnels, the CA, origin TLS, ALPN
- chain.py      upstream proxies: routes and dialling through one
- dial.py       resolve once, check the dialled address against policy, connect
- flow.py       pause/resume bookkeeping for backpressure
- runtime.py    what the connections of one service share; the exchanges' environment
- reverse.py, backend.py   the inbound gateway's listener connection and backend connector
"""
