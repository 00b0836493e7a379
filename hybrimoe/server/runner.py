"""Running the app under uvicorn as an operator needs it: header and keep-alive timeouts, and a
graceful shutdown on SIGTERM that exits 0.

SIGTERM (or Ctrl-C): uvicorn stops listening and asks open connections to close; before that,
`ServerState.begin_shutdown` refuses new requests (503), fails the queued ones (503) and gives the
running one --shutdown-timeout seconds, after which it ends with an error event (streaming) or a 503.
uvicorn's own grace period is longer, so every client gets an answer before the loop stops.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from hybrimoe.errors import ConfigError

log = logging.getLogger(__name__)

UVICORN_GRACE_MARGIN = 5.0  # seconds uvicorn waits beyond --shutdown-timeout for responses to end


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete `seconds`
    after it opened (or after its previous response): uvicorn only times out idle keep-alive
    connections, and any byte received cancels that timer, so a slow sender could hold a connection."""

    class H11WithHeaderTimeout(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            cycle = self.cycle  # a new request replaces it once its headers are complete
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._header_timeout, cycle)

        def _header_timeout(self, cycle_when_armed: Any) -> None:
            if self.cycle is cycle_when_armed and not self.transport.is_closing():
                log.info("closing a connection whose request headers did not arrive within %g s", seconds)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return H11WithHeaderTimeout


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that lets the app drain first (`ServerState.begin_shutdown`)."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets: Any = None) -> None:
        self.state.begin_shutdown()
        await super().shutdown(sockets)


def run_server(app: Any, host: str, port: int, log_level: str = "info") -> None:
    """Serve `app` (from `create_app`) until SIGTERM / SIGINT, then shut down gracefully."""
    state = app.state.server
    options = state.options
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=header_timeout_protocol(
        options.header_timeout), timeout_keep_alive=options.keep_alive_timeout,
        timeout_graceful_shutdown=options.shutdown_timeout + UVICORN_GRACE_MARGIN)
    server = GracefulServer(config, state)
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal it caught once it has shut down; with a handler of ours in place
        # that is a no-op, so SIGTERM ends in a normal exit (status 0) instead of death by signal.
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    else:
        server.run()
    if not server.started:
        raise ConfigError(f"the server could not start on {host}:{port} (see the log above)")
