"""The transmission phase of one connection: requests in, replies out.

The caller's thread reads the request stream in large pieces and parses every
request a recv brought before it calls recv again. What it parsed goes on as
one list: small requests (at most `SMALL_PAYLOAD` bytes each) run on the
reader's own thread when the worker has nothing left to do; anything else is
queued for the worker thread, which executes it against the locked volume
while the reader receives the next requests. Replies gathered along the way
leave with one `sendmsg` (headers + payloads). Many requests may be in flight;
they are executed in the order they arrived, and replies leave in completion
order, which the protocol allows.

Why both: under 4 KiB random writes (fio, queue depth 32) a queue put and a
worker wake-up per request cost more than the write itself (py-spy: ~30 % of
the GIL samples in the put alone), and two threads sharing the GIL buy no
parallelism for Python work. For large requests the worker does pay off: its
device I/O overlaps the reader's recv of the next payload.

The worker merges queued READs (or WRITEs) that continue each other into one
volume call of up to `READ_BATCH` (`BATCH_BYTES`): the volume then has several
device requests in flight instead of one per NBD request, and the lock is
taken once per batch (profiling nbdcopy against the real volume: per-request
calls kept the device at queue depth one or two and left workers waiting on
the lock). Merged READs are pipelined (`readpipe`): the worker starts the next
batch while earlier ones are read and answered. Any other command waits until
the READs before it have been answered, so commands still take effect in the
order they arrived.

A broken request header (bad magic, a write payload larger than we accept)
ends the connection after the requests read before it are answered; a
request that is merely invalid gets its error reply. A partly received write
is never applied.

A bug (an exception that is not one of the errors a reply stands for, see
`commands.ANSWERED`) on any of the connection's threads must not leave its
requests unanswered and the client waiting forever: the connection logs one
line, hangs up at once and winds down (`_fail`); the server and its other
connections go on.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from . import protocol as p
from .commands import ANSWERED, Commands, Part, Payload, RequestError
from .exports import MAX_PAYLOAD, LockedVolume
from .negotiate import Session
from .readpipe import READ_BATCH, ReadPipeline
from .rxbuf import BufferPool, Receiver
from .sockio import ConnectionClosed, Stream, send_all

log = logging.getLogger(__name__)

INFLIGHT_BYTES = 128 << 20       # queued per connection before reading pauses (see _Job.cost)
REPLY_BYTES = 64 << 10          # replies gathered into one sendmsg while more jobs wait
REPLY_PARTS = 64                 # ... or this many pieces (a client waits for its replies)
BATCH_BYTES = 16 << 20           # largest merged WRITE handed to the volume
BLOCK_BATCH = 256                # one-block WRITEs the volume places in one call (write_blocks)
_BATCH_FLAGS = {p.CMD_READ: p.CMD_FLAG_DF, p.CMD_WRITE: p.CMD_FLAG_FUA}
_BATCH_LIMIT = {p.CMD_READ: READ_BATCH, p.CMD_WRITE: BATCH_BYTES}
SMALL_PAYLOAD = 64 << 10         # write payloads copied out of the receive buffer;
#                                  merged READs larger than this are pipelined


@dataclass(slots=True)
class _Job:
    req: p.Request
    buf: Payload = None      # write payload: a view of the receive buffer while the
    #                          reader holds the job, else bytes or a pooled bytearray
    cost: int = 4096   # what the job holds while queued: its payload, and at least a
    #                    page, so a client that never reads its replies cannot queue
    #                    requests without bound


class Transmission(Commands):
    def __init__(self, sock: Stream, session: Session, vol: LockedVolume,
                 name: str = "connection") -> None:
        super().__init__(session, vol)
        self.sock = sock
        self.name = f"{name}, export {session.export.name!r}"    # for the log
        self._jobs: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._reader_done = False       # the worker has taken the reader's last list
        # one executor at a time: the worker, or the reader running small requests
        # itself (_run_inline); lists queued by the reader / taken / finished by
        # the worker (the reader runs inline only when all are finished)
        self._exec = threading.Lock()
        self._queued = self._taken = self._finished = 0
        self._pool = BufferPool()
        self._inflight = 0
        self._done_cost = 0             # finished jobs' cost not yet given back
        self._cond = threading.Condition()
        self._send_failed = False
        self._broken = False            # a bug: hung up, nothing more runs (_fail)
        self._out: list[Part] = []      # replies not sent yet (their read buffers
        self._out_bytes = 0             # are in self._leases)
        self._send_lock = threading.Lock()
        self._reads = ReadPipeline(self, self._send_now, self._credit, self._fail)
        self._synced = False            # the last request was a FLUSH or a FUA write

    # --- reader side (the connection's own thread) ---

    def run(self) -> None:
        worker = threading.Thread(target=self._work, name="nbd-worker", daemon=True)
        worker.start()
        try:
            self._read_loop()
        except (ConnectionClosed, OSError) as e:
            log.debug("connection ended: %s", e)
        except p.ProtocolError as e:
            log.warning("closing connection: %s", e)
        except Exception as e:  # noqa: BLE001 - a bug in the reader: hang up
            self._fail(e)
        finally:
            self._jobs.put(None)
            worker.join()
            self._reads.close()

    def _read_loop(self) -> None:
        """Parse every request the receive buffer holds before the next recv, and
        pass them on as one list (`_queue`): at most one queue hand-off (one
        wake-up of the worker) per recv instead of one per request. Small write
        payloads stay in the receive buffer, so the list is always passed on
        before a recv; large ones are received into a pooled buffer."""
        rx = Receiver(self.sock)
        jobs: list[_Job] = []
        try:
            while not self._send_failed:
                if jobs and rx.available() < p.REQUEST.size:
                    ahead = self._expects_flush(jobs)
                    jobs = self._queue(jobs)             # the next header needs a recv
                    if ahead and not rx.available():
                        self._sync_ahead()
                req = rx.header()
                if req.type == p.CMD_DISC:
                    return
                if req.type != p.CMD_WRITE:
                    jobs.append(_Job(req))
                    continue
                n = req.length
                if n > MAX_PAYLOAD:                      # cannot skip it: hang up
                    raise p.ProtocolError(f"write payload of {n} bytes")
                if n <= SMALL_PAYLOAD:
                    if jobs and rx.available() < n:
                        jobs = self._queue(jobs)
                    jobs.append(_Job(req, rx.take_view(n), max(n, 4096)))
                    continue
                jobs = self._queue(jobs)
                job = _Job(req, cost=n)
                self._reserve(n)                         # before the buffer is taken
                job.buf = self._pool.get(n)
                rx.take_into(memoryview(job.buf)[:n])
                self._queued += 1
                self._jobs.put([job])
        finally:
            if jobs:                 # complete requests read before the end: answer them
                self._queue(jobs)

    def _queue(self, jobs: list[_Job]) -> list[_Job]:
        """Run `jobs` here if they are small and the worker has nothing left to do,
        else hand them to the worker (waiting while too much is in flight); returns
        a fresh list for the next ones."""
        if self._broken:
            return []
        if jobs and not self._run_inline(jobs):
            for job in jobs:          # views of the receive buffer: the next recv reuses it
                if isinstance(job.buf, memoryview):
                    job.buf = job.buf.tobytes()
            self._reserve(sum(job.cost for job in jobs))
            self._queued += 1
            self._jobs.put(jobs)
        return []

    def _expects_flush(self, jobs: list[_Job]) -> bool:
        """Do these requests look like a synchronous writer's (writes after a FLUSH
        or a FUA write, as a guest's fsync or fio --fsync=1 send): one that waits
        for the reply and then flushes?"""
        last = jobs[-1].req
        after_sync = self._synced
        self._synced = last.type == p.CMD_FLUSH or bool(last.type == p.CMD_WRITE
                                                        and last.flags & p.CMD_FLAG_FUA)
        if not after_sync:
            return False
        return all(j.req.type == p.CMD_WRITE and not j.req.flags for j in jobs)

    def _sync_ahead(self) -> None:
        """While a synchronous writer turns the last reply into its FLUSH, make the
        writes durable as that FLUSH would (`Volume.sync_ahead`: a record and its
        fdatasync), so the FLUSH finds nothing left to do. Only when every request
        so far has been answered (the list ran here, or the worker finished it)."""
        if self._finished != self._queued or self._broken:
            return
        try:
            self.vol.sync_ahead()
        except ANSWERED as e:          # the volume is failed: the FLUSH will say so
            log.debug("%s: writing the intent log ahead failed: %s", self.name, e)

    def _run_inline(self, jobs: list[_Job]) -> bool:
        """Small requests run on the reader's thread when the worker is idle: no
        hand-off, no wake-up, the replies leave before the next recv. Under 4 KiB
        random writes the queue put and the worker's wake-up cost more than the
        write (the two threads share the GIL, so the worker buys no parallelism for
        Python work; it pays off for large requests, whose I/O overlaps the recv).
        Only when every list queued before has been finished: order is kept."""
        if any(job.req.length > SMALL_PAYLOAD for job in jobs):
            return False
        if not self._exec.acquire(blocking=False):
            return False
        try:
            if self._finished != self._queued:
                return False
            if len(jobs) == 1 and not self._reads.busy():
                self._run_one(jobs[0])
                return True
            self._reserve(sum(job.cost for job in jobs))   # never waits: nothing queued
            self._process(deque(jobs))
            return True
        except Exception as e:  # noqa: BLE001 - a bug: hang up; the jobs are not run again
            self._fail(e)
            return True
        finally:
            self._exec.release()

    def _run_one(self, job: _Job) -> None:
        """A lone small request with nothing else in flight (a client at queue depth
        one, each request waiting for the last reply): what `_process` does for it,
        without the flow-control credit, the gathering and the batching, which
        have nothing to work on (they cost a FLUSH a third of its Python time)."""
        if job.req.type == p.CMD_WRITE and self._batchable(job.req):
            self._write_one(job)
        else:
            self._execute(job)
        self._flush_replies()

    def _reserve(self, n: int) -> None:
        with self._cond:
            while self._inflight and self._inflight + n > INFLIGHT_BYTES and not self._broken:
                self._cond.wait()
            self._inflight += n

    # --- worker side ---

    def _work(self) -> None:
        pending: deque[_Job] = deque()
        try:
            while self._take(pending, block=True):
                with self._exec:
                    self._process(pending)
                    self._finished = self._taken
        except BaseException as e:  # noqa: BLE001 - a bug: hang up, never go quiet
            self._fail(e)
        finally:
            self._reads.drain()

    def _process(self, pending: deque[_Job]) -> None:
        """Run the pending jobs (and what else is queued by then), then send the
        replies and give back their flow-control credit. The caller holds _exec."""
        try:
            while not self._broken and (pending or self._take(pending, block=False)):
                job = pending.popleft()
                batch = self._gather(job, pending)
                if job.req.type == p.CMD_READ:
                    if batch is not None and self._pipeline(batch):
                        continue
                elif self._reads.busy():
                    self._reads.drain()          # READs before it first: order is kept
                try:
                    if batch is None:
                        self._execute(job)
                    elif len(batch) == 1 and job.req.type == p.CMD_WRITE:
                        batch += self._gather_blocks(job, pending)
                        if len(batch) > 1:
                            self._write_blocks(batch)
                        else:
                            self._write_one(job)
                    else:
                        self._execute_batch(batch)
                finally:
                    self._done(batch or [job])
        finally:
            self._flush_replies()            # nothing else to do: answer now
            self._release()

    def _take(self, pending: deque[_Job], *, block: bool) -> bool:
        """Move the next queued list of jobs into `pending`; False when there is none
        (and, blocking, when the reader has finished, or after a bug)."""
        if self._reader_done or self._broken:
            return False
        try:
            jobs = self._jobs.get(block)
        except queue.Empty:
            return False
        if jobs is None:
            self._reader_done = True
            return False
        self._taken += 1
        pending.extend(jobs)
        return True

    def _gather(self, job: _Job, pending: deque[_Job]) -> list[_Job] | None:
        """`job` plus the pending jobs that continue it (same command, next offset);
        None when `job` cannot be merged with anything (see _batchable)."""
        if not self._batchable(job.req):
            return None
        batch = [job]
        end, total = job.req.offset + job.req.length, job.req.length
        limit = _BATCH_LIMIT[job.req.type]
        while total < limit and (pending or self._take(pending, block=False)):
            nxt = pending[0].req
            if (nxt.type != job.req.type or nxt.offset != end
                    or total + nxt.length > limit or not self._batchable(nxt)):
                break
            batch.append(pending.popleft())
            end += nxt.length
            total += nxt.length
        return batch

    def _batchable(self, req: p.Request) -> bool:
        allowed = _BATCH_FLAGS.get(req.type)
        return (allowed is not None and not req.flags & ~allowed
                and 0 < req.length <= MAX_PAYLOAD
                and req.offset + req.length <= self.export.size
                and not (req.type == p.CMD_WRITE and self.export.read_only))

    def _done(self, batch: list[_Job]) -> None:
        """Pooled buffers go back at once; what the jobs held is given back to the
        reader in lumps (`_release`): one condition round trip per REPLY_BYTES of
        small requests, not one per request. After a large request the replies
        leave at once: there are no syscalls worth saving."""
        length = 0
        for job in batch:
            self._done_cost += job.cost
            length += job.req.length
            if isinstance(job.buf, bytearray):
                self._pool.put(job.buf)
        if length >= REPLY_BYTES:
            self._flush_replies()
        if self._done_cost >= REPLY_BYTES:
            self._release()

    def _release(self) -> None:
        if self._done_cost:
            self._credit(self._done_cost)
            self._done_cost = 0

    def _credit(self, cost: int) -> None:
        with self._cond:
            self._inflight -= cost
            self._cond.notify()

    def _pipeline(self, batch: list[_Job]) -> bool:
        """Hand valid contiguous READs to the read pipeline unless they are small
        (4 KiB random reads: a thread hand-off each would cost more than it buys)."""
        if sum(job.req.length for job in batch) <= SMALL_PAYLOAD:
            return False
        self._reads.submit([job.req for job in batch], sum(job.cost for job in batch))
        return True

    def _execute_batch(self, batch: list[_Job]) -> None:
        """One volume call for contiguous requests, then every reply in one send
        (READs here are small ones, see _pipeline)."""
        if batch[0].req.type == p.CMD_READ:
            parts, leases = self.read_replies([job.req for job in batch])
            self._leases += leases               # before the send that may flush them
            self._send(parts)
            return
        try:
            self._write_batch(batch, sum(job.req.length for job in batch))
            parts = [p.pack_simple_reply(job.req.cookie) for job in batch]
        except ANSWERED as e:
            parts = self.error_replies([job.req for job in batch], e)
        self._send(parts)

    def _write_one(self, job: _Job) -> None:
        """A valid WRITE merged with nothing, the common case of random writes: what
        _execute_batch does, without its lists and generators."""
        req = job.req
        reply: Part
        try:
            self._change("write", req.offset, _payload(job), fua=bool(req.flags & p.CMD_FLAG_FUA))
            reply = p.pack_simple_reply(req.cookie)
        except ANSWERED as e:
            reply, = self.error_replies([req], e)
        self._out.append(reply)
        self._out_bytes += len(reply)
        if len(self._out) >= REPLY_PARTS:
            self._flush_replies()

    def _plain_block(self, req: p.Request) -> bool:
        """A WRITE of one whole block at a block boundary, without flags."""
        bs = self.export.block_size
        return (req.type == p.CMD_WRITE and req.flags == 0 and req.length == bs
                and req.offset % bs == 0 and req.offset + bs <= self.export.size
                and not self.export.read_only)

    def _gather_blocks(self, job: _Job, pending: deque[_Job]) -> list[_Job]:
        """The plain one-block WRITEs queued right after `job` (random 4 KiB writes at
        a queue depth), up to BLOCK_BATCH in all: the volume places them in one call."""
        if not self._plain_block(job.req) or not hasattr(self.vol.volume, "write_blocks"):
            return []
        more: list[_Job] = []
        while len(more) < BLOCK_BATCH - 1 and (pending or self._take(pending, block=False)):
            if not self._plain_block(pending[0].req):
                break
            more.append(pending.popleft())
        return more

    def _write_blocks(self, batch: list[_Job]) -> None:
        parts: list[Part]
        try:
            self._change("write_blocks", [j.req.offset for j in batch],
                         [_payload(j) for j in batch], fua=False)
            parts = [p.pack_simple_reply(j.req.cookie) for j in batch]
        except ANSWERED as e:
            parts = self.error_replies([j.req for j in batch], e)
        self._send(parts)

    def _write_batch(self, batch: list[_Job], total: int) -> None:
        fua = any(job.req.flags & p.CMD_FLAG_FUA for job in batch)
        if len(batch) == 1:                  # no merge: no copy
            self._change("write", batch[0].req.offset, _payload(batch[0]), fua=fua)
            return
        if hasattr(self.vol.volume, "write_parts"):   # one copy, into the volume's buffer
            self._change("write_parts", batch[0].req.offset, [_payload(j) for j in batch],
                         fua=fua)
            return
        buf = self._pool.get(total)
        try:
            view, at = memoryview(buf), 0
            for job in batch:
                view[at:at + job.req.length] = _payload(job)
                at += job.req.length
            self._change("write", batch[0].req.offset, view[:total], fua=fua)
        finally:
            self._pool.put(buf)

    def _execute(self, job: _Job) -> None:
        req = job.req
        try:
            parts = self._dispatch(req, job.buf)
        except RequestError as e:
            parts = [self._error_reply(req, e.error, str(e))]
        except ANSWERED as e:             # a bug is not answered: see _fail
            parts = self.error_replies([req], e)
        self._send(parts)

    def _send(self, parts: Sequence[Part]) -> None:
        """Queue replies; they leave together when the worker runs out of queued
        jobs, or REPLY_BYTES or REPLY_PARTS gather, or after a large request (one
        sendmsg for many small replies). Holding them longer stalls a client that
        keeps its queue full: sequential nbdcopy writes fell from ~0.8 to ~0.6."""
        self._out.extend(parts)
        self._out_bytes += sum(len(b) for b in parts)
        if self._out_bytes >= REPLY_BYTES or len(self._out) >= REPLY_PARTS:
            self._flush_replies()

    def _flush_replies(self) -> None:
        """Send the gathered replies; read buffers go back once they have left."""
        parts, leases = self._out, self._leases
        self._out, self._out_bytes, self._leases = [], 0, []
        try:
            self._send_now(parts)
        finally:
            parts.clear()                # the views go before their buffers are reused
            for release in leases:
                release()

    def _send_now(self, parts: list[Part]) -> None:
        if self._send_failed or not parts:
            return
        try:
            with self._send_lock:
                send_all(self.sock, parts)
        except OSError as e:           # client gone: stop reading, drain quietly
            log.debug("send failed: %s", e)
            self._send_failed = True
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)

    def _fail(self, e: BaseException) -> None:
        """A bug on one of the connection's threads (reader, worker, read pipeline):
        the requests in flight will not all be answered, so hang up now and let the
        client see the connection close rather than wait forever. One line in the
        log (the traceback at debug level); nothing queued runs after it, and every
        thread winds down (the reader sees EOF, waits for no credit, the worker
        takes no more jobs)."""
        with self._cond:
            first, self._broken, self._send_failed = not self._broken, True, True
            self._cond.notify_all()
        if first:
            log.error("%s: closing the connection after an internal error: %s: %s",
                      self.name, type(e).__name__, e)
        log.debug("%s: internal error", self.name, exc_info=e)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def _payload(job: _Job) -> bytes | memoryview:
    """A write's payload: in the receive buffer, copied out of it, or the first
    `length` bytes of its pooled buffer."""
    buf = job.buf
    assert buf is not None
    return memoryview(buf)[:job.req.length] if isinstance(buf, bytearray) else buf
