"""Synchronous writes through the intent log: `sync` makes every write so far
durable with one log record and one fdatasync instead of a CP, and opening a
volume replays the records that follow its committed root (intentlog.py).

Replay applies each record to the in-memory state exactly as the writes did
(the blocks it maps become allocated, the blocks it replaces become free at the
next CP) and leaves the commit to the next CP; a read-only open sees the
replayed writes too (inline data it may not write goes to the I/O layer's
overlay). A record is replayed only if every block it points at holds what the
record says: one that does not was never acknowledged (its fdatasync did not
return), and no later record can exist, since each record is durable before the
next is written.
"""

from __future__ import annotations

import numpy as np

from .blockio import runs_of
from .intentlog import INLINE, UNMAP, Record, record_problem
from .writes import Writes


class Syncing(Writes):
    """sync() and the replay of the intent log."""

    concurrent_sync = True        # sync may be called without the caller's lock (NBD)

    def sync(self) -> None:
        """Make every write so far durable (an NBD FLUSH, a FUA write): one intent
        log record when the log has room for it, else a CP.

        Group commit: the record is packed under the volume lock, but written and
        fdatasynced outside it, so writes go on meanwhile; syncs that arrive then
        wait for the log (one record in flight, each durable before the next is
        written) and share the next record. A CP waits for a record in flight (it
        starts the log over). Never call this holding the volume lock."""
        with self._log_lock:
            self._sync_log(ahead=False)

    def sync_ahead(self) -> None:
        """`sync`, when it is cheap and nobody waits for it: for a synchronous
        writer (NBD at queue depth one) between the reply to its write and the
        FLUSH it is expected to send next, which then finds nothing left to do.
        The record and its fdatasync overlap the client's turn-around instead of
        following the FLUSH. Does nothing while a sync is at work (it will take
        these writes too), nor when only a CP would do or the record would point at
        data still to drain (the FLUSH does those)."""
        if self._log_lock.acquire(blocking=False):
            try:
                self._sync_log(ahead=True)
            finally:
                self._log_lock.release()

    def _sync_log(self, *, ahead: bool) -> None:
        """Pack the pending changes as a record under the lock, then write and
        fdatasync it outside (or commit, when the log cannot take them and this is
        not `ahead`). The caller holds the log lock."""
        with self._lock:
            self._check_usable()
            if not self.writable:
                return
            log = self.log
            if ahead and (not log.enabled or log.overflow or log.pointers):
                return
            if not log.enabled or log.overflow:
                self.commit()
                return
            if not log.entries:
                return                # every change so far is logged or committed
            try:
                if log.pointers:
                    self.io.drain()   # the data the record points at, first
                rec, at = log.prepare()
            except BaseException as e:
                self._failed = f"writing the intent log failed ({e})"
                raise
            self._log_writing = True
        try:
            log.write_record(rec, at)
        except BaseException as e:
            self._failed = f"writing the intent log failed ({e})"
            raise
        finally:
            with self._lock:
                self._log_writing = False
                self._log_idle.notify_all()

    def _replay_log(self) -> int:
        """Apply the records that follow the committed root; returns how many."""
        if not self.log.enabled:
            return 0
        done: list[Record] = []
        for rec in self.log.records():
            if self._replay_problem(rec) is not None:
                break
            self._apply_record(rec)
            done.append(rec)
        self.log.resume_after(done)
        return len(done)

    def _replay_problem(self, rec: Record) -> str | None:
        """Why a record cannot be replayed onto the current state, if it cannot."""
        why = record_problem(rec, self._busy_plane().copy(),
                             first_data_vbn=self.sb.first_data_vbn, nblocks=self.nblocks,
                             virtual_blocks=self.virtual_blocks, block_size=self.block_size,
                             read_ptrs=lambda p, v: self.io.read_ptrs_into(p, v, verify=False))
        return None if why is None else f"record {rec.seq} {why}"

    def _apply_record(self, rec: Record) -> None:
        bs = self.block_size
        inline: list[tuple[int, bytes]] = []
        for e in rec.entries:
            if e.kind == UNMAP:
                old = self.lba.set(e.vblock, np.zeros((e.count, 2), dtype=np.uint64))
                self._free_vbns(old[:, 0])
                continue
            assert e.ptrs is not None
            for _, start, count in runs_of(e.ptrs[:, 0]):
                self._mark_allocated(start, start + count)
            old = self.lba.set(e.vblock, e.ptrs)
            self._free_vbns(old[:, 0])
            if e.kind == INLINE:
                assert e.data is not None
                vbns = e.ptrs[:, 0].tolist()
                inline += [(v, bytes(e.data[k * bs:(k + 1) * bs])) for k, v in enumerate(vbns)]
        if not inline:
            return
        if self.writable:           # free in the committed state: written before the CP
            self.io.write_many(inline)
        else:
            self.io.overlay.update(inline)
