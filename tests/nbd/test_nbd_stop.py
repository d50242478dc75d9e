"""`Server.stop` is what `serve`'s SIGTERM/SIGINT handler calls, in the main thread,
between any two bytecodes of it: it must not wait for a lock that thread may hold."""

from __future__ import annotations

import threading

from blockxfer.nbd.server import Server
from tests.nbd.fakes import FakeVolume


def test_stop_takes_no_lock_the_main_thread_may_hold() -> None:
    server = Server(FakeVolume(1 << 20))
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    cond: threading.Condition = getattr(server._stopping, "_cond")   # noqa: B009 (typeshed hides it)
    with cond:                              # as shutdown's own Event.set holds it
        done = threading.Event()

        def stop() -> None:
            server.stop()
            done.set()
        threading.Thread(target=stop, daemon=True).start()
        assert done.wait(5), "stop() waited for the stop event's lock"
    loop.join(10)
    assert not loop.is_alive() and server._stopping.is_set()
