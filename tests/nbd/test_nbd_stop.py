"""`Server.stop` is what `serve`'s SIGTERM/SIGINT handler calls, in the main thread,
between any two bytecodes of it: it must not wait for a lock that thread may hold
(its stop flag was an Event, whose set() could wait forever for the event's own
lock)."""

from __future__ import annotations

import os
import signal
import threading

from blockxfer.nbd.server import Server
from tests.nbd.fakes import FakeVolume


def test_stop_from_a_signal_while_the_main_thread_holds_a_lock() -> None:
    server = Server(FakeVolume(1 << 20))
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    done = threading.Event()

    def handler(*_: object) -> None:
        server.stop()
        done.set()
    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with server._conns_lock:             # as start_connection or shutdown hold it
            os.kill(os.getpid(), signal.SIGUSR1)      # the handler runs here, in this thread
            assert done.wait(5), "stop() waited for a lock the main thread held"
    finally:
        signal.signal(signal.SIGUSR1, previous)
    loop.join(10)
    assert not loop.is_alive() and server._stopping
