"""
The exchange: one request and its response between two sides, with no wire and no I/O.


- side.py     the downstream and upstream side interfaces, their events, the connector
"""
