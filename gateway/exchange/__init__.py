"""
The exchange: one request and its response between two sides, with no wire and no I/O.

- message.py  Request and Response heads as the exchange sees them (end-to-end fields only)
- side.py     the downstream and upstream side interfaces, their events, the connector
"""
