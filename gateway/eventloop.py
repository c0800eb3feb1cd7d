"""
The epoll reactor's dispatch without Twisted's per-event log context.

For every ready descriptor, Twisted's epoll reactor calls the handler through
C{log.callWithLogger}: it asks the protocol for its log prefix, builds a context
dictionary, and pushes and pops it on a thread-local stack, so that a legacy
C{log.msg} inside the handler is tagged with the connection. proxygate logs through
C{twisted.logger}, which never reads that context, and on a keep-alive GET (four socket
events per request) the wrapper was about 7% of the proxy's CPU. The handler itself,
C{_doReadOrWrite}, already catches and logs whatever a read or write raises, so
dispatching to it directly loses nothing but the prefix on legacy log lines.

Installed by proxygate's own processes only (the twistd plugin and the workers): an
application that embeds the service keeps its reactor as it is.
"""

from __future__ import annotations

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

__all__ = ["dispatchDirectly"]

_log = Logger()


def dispatchDirectly(reactor) -> bool:
    """
    Make C{reactor} dispatch socket events without the log context, if it is Twisted's
    epoll reactor (any other reactor is left alone). Returns whether it did.
    """
    # Only the loop this replaces: not a subclass, not another reactor, not a Twisted whose
    # epoll loop has changed shape (then proxygate runs on Twisted's own, a little slower).
    if type(reactor) is not EPollReactor or EPollReactor.doIteration is not EPollReactor.doPoll:
        return False
    selectables = getattr(reactor, "_selectables", None)
    dispatch = getattr(reactor, "_doReadOrWrite", None)
    if not isinstance(selectables, dict) or dispatch is None or not hasattr(reactor, "_poller"):
        return False

    def doIteration(timeout: float | None) -> None:
        # EPollReactor.doPoll, less callWithLogger. EINTR is retried by Python itself
        # (PEP 475); any other error is as loud as it is there.
        events = reactor._poller.poll(-1 if timeout is None else timeout, len(selectables))
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    dispatch(selectable, fd, event)
                except Exception:
                    # _doReadOrWrite logs what the handler raises; this is its own failure
                    # (a connectionLost that raised), which callWithLogger also logged.
                    _log.failure(
                        "While dispatching an event on {selectable!r}", selectable=selectable
                    )

    reactor.doIteration = doIteration
    return True
