"""The HTTP server process around the app (uvicorn): the listening socket, slow clients and shutdown.

- `bind(host, port)` takes the port before the model loads, so a busy port fails the start at once instead of
  after minutes of loading (clients are refused, not left hanging, until the server listens).
- `protocol(request_timeout)`: uvicorn closes idle keep-alive connections, but not a connection that sends
  half a request and stops: thousands of those exhausted the file descriptors (issue 13). A client gets
  `request_timeout` seconds from its first byte (or from connecting) to finish sending a request's headers and
  body; then the connection is closed. Streaming responses are not affected (the request was read by then).
- `Server`: the first SIGTERM or SIGINT stops accepting and lets requests in flight finish for up to
  `shutdown_timeout` seconds; then `on_deadline` is called (the app ends each remaining stream with an error
  event) and, a few seconds later, whatever is left is cancelled. A second signal exits at once.
"""
from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

log = logging.getLogger("exaserve.server")

CANCEL_GRACE_S = 5.0  # after the deadline's error events, how long before uvicorn cancels what is left


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening; OSError (e.g. the port is in use) if it cannot be."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def protocol(request_timeout: float):
    """uvicorn's httptools protocol, closing connections that take longer than request_timeout to send a request."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class TimedProtocol(HttpToolsProtocol):
        """Armed when a connection opens and when the first bytes of a request arrive; disarmed when the
        parser has the whole request."""
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._read_timer is None:
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._read_timer = self.loop.call_later(request_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _timed_out(self) -> None:
            self._read_timer = None
            if not self.transport.is_closing():
                log.info("closing a connection that sent no complete request in %.0f s", request_timeout)
                self.transport.close()

    return TimedProtocol


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, shutdown_timeout: float, on_deadline=None):
        config.timeout_graceful_shutdown = shutdown_timeout + CANCEL_GRACE_S
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        self.on_deadline = on_deadline
        self._deadline_called = False

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:  # a second signal, of either kind
            log.warning("second signal: exiting now")
            self.force_exit = True
            self._deadline()
        super().handle_exit(sig, frame)

    def _deadline(self) -> None:
        if not self._deadline_called and self.on_deadline is not None:
            self._deadline_called = True
            self.on_deadline()

    async def shutdown(self, sockets=None) -> None:
        if self.server_state.tasks:
            log.info("shutting down: requests in flight have %.0f s to finish", self.shutdown_timeout)
        timer = asyncio.get_running_loop().call_later(self.shutdown_timeout, self._deadline)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
