"""
The Twisted side: protocols that own sockets, built around the sans-IO pieces.

- client.py   the front door: reads request heads, applies policy/auth, picks a path
- forward.py  an absolute-form request forwarded to an origin (and its response)
- connect.py  CONNECT: check, dial, 200, splice
- tunnel.py   the blind byte pipe behind CONNECT and 101 upgrades
- origin.py   origin connections (response parsing) and their keep-alive pool
- dial.py     resolve once, check the dialled address against policy, connect
- flow.py     pause/resume bookkeeping for backpressure; immediate writes, wide reads
"""
