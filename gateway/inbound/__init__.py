"""
The inbound gateway ("reverse proxy"): which route serves a request, which backend of the
route gets it, and what the backend and the client see. Pure decisions, no I/O, except
health.py (the Twisted health checker).

- routes.py   match syntax, path normalisation, the route table, prefix stripping
- balance.py  backends with up/down state, round_robin / least_conn / sticky, failover
- rewrite.py  the request fields a backend gets, the response fields a client gets
- runtime.py  the gateway of one configuration: routes with their pools and rewriters
- health.py   active health checks (an IService) feeding balance.py's state machine
"""
