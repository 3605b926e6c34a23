"""A live uvicorn server on 127.0.0.1 in a daemon thread, for the tests that talk to it with real clients."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def live_server(app, **config) -> Iterator[int]:
    """Serve ``app`` on 127.0.0.1 (a free port; ``config`` goes to ``uvicorn.Config``); yields the bound port, and
    stops the server on exit."""
    import uvicorn

    config.setdefault("port", 0)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", log_level="error", **config))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not srv.started:
            assert time.time() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        yield srv.servers[0].sockets[0].getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(timeout=60)
    assert not thread.is_alive(), "the server did not stop"
