"""READs in flight on one connection: the next reads' device I/O starts while
earlier ones are still being read and their replies sent.

Profiling nbdcopy against the real volume: sequential reads are not CPU-bound
(little GIL time, checksums ~40 ms/GiB); what held them back was queue depth.
The worker read one merged batch, waited for all of it, handed the reply to the
sender and only then started the next batch: while the batch's last device
requests drained, and whenever the client had nothing more queued because it
waited for those replies, the device idled. After rewrites a volume's data lies
in shorter runs, so a batch is more, smaller requests and the idle tail longer.

Here each merged READ (at most `READ_BATCH` bytes) runs on a thread of the
connection's own small pool: `Volume.read_leased` looks its pointers up and
reads them through the volume's block I/O pool, and the same thread then sends
the replies (each carries its request's cookie; NBD allows replies in any
order) and hands the buffer back only after the send, once no view of it is
used. At most `DEPTH` device requests' worth (`UNIT` bytes each, a batch at
least one) are in flight per connection: that bounds the memory held in read
buffers, and the worker waits for room. A batch that fails is read again
request by request, so a damaged block fails only the requests that cover it
(`Commands.read_replies`, which the worker's own READs use too). A bug on a
pipeline thread is handed to `fail`: the connection hangs up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from . import protocol as p
from .commands import Commands, Part

log = logging.getLogger(__name__)

DEPTH = 16                      # device requests in flight per connection (UNIT bytes each)
UNIT = 1 << 20                  # the volume's largest device request (blockio.MAX_REQUEST)
READ_BATCH = 4 << 20            # largest merged READ: several batches fit in DEPTH


class ReadPipeline:
    def __init__(self, conn: Commands, send: Callable[[list[Part]], None],
                 credit: Callable[[int], None], fail: Callable[[BaseException], None],
                 depth: int | None = None) -> None:
        """`send` sends one group of replies (and never raises); `credit` gives a
        finished batch's flow-control cost back to the connection's reader; `fail`
        hangs the connection up after a bug."""
        self.conn, self._send, self._credit, self._fail = conn, send, credit, fail
        self.depth = depth or DEPTH
        self._units = 0                      # in flight
        self._cond = threading.Condition()
        self._pool: ThreadPoolExecutor | None = None

    def busy(self) -> bool:
        return self._units > 0

    def submit(self, reqs: list[p.Request], cost: int) -> None:
        """Start valid READs that continue each other (see transmit's _gather);
        waits while the connection has `depth` units in flight."""
        total = reqs[-1].offset + reqs[-1].length - reqs[0].offset
        units = min(self.depth, max(1, -(-total // UNIT)))
        with self._cond:
            while self._units and self._units + units > self.depth:
                self._cond.wait()
            self._units += units
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix="nbd-read")
        self._pool.submit(self._run, reqs, cost, units)

    def drain(self) -> None:
        """Wait until every READ submitted has been answered."""
        with self._cond:
            while self._units:
                self._cond.wait()

    def close(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _run(self, reqs: list[p.Request], cost: int, units: int) -> None:
        try:
            self._answer(reqs)
        except BaseException as e:  # noqa: BLE001 - a bug: unanswered requests, so hang up
            self._fail(e)
        finally:
            self._credit(cost)
            with self._cond:
                self._units -= units
                self._cond.notify_all()

    def _answer(self, reqs: list[p.Request]) -> None:
        parts, leases = self.conn.read_replies(reqs)
        try:
            self._send(parts)
        finally:
            parts.clear()                # the views go before the buffers are reused
            for release in leases:
                release()
