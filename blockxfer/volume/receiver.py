"""The receive side of the volume: an incoming image's blocks placed at their VBNs,
its root committed as this volume's own.

A receiver is the only way a stream (or a tape restore, or later a mirror) changes
a target: `stream/` decodes and checks records and hands them here. Atomicity:
blocks land only in VBNs free in the target's committed state, the VBNs received so
far are kept in the local area (for resume), and the superblock naming the foreign
root is the last write. A receiver comes from an open volume (`Volume.receiver`,
receiveside.py,
for an incremental, also into a volume a server holds open) or from a device
(`Receiver.for_device`, for a full image written over whatever it held).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from bitarray import bitarray

from blockxfer.device import BlockDevice
from blockxfer.errors import BlockxferError, FormatError, StreamError

from .blockio import BlockIO
from .layout import Catalog, RootRecord, SnapshotEntry, Superblock
from .local import LocalArea, LocalState
from .objects import BlobObject, PlaneObject, empty_plane
from .properties import HOLDS
from .receiving import InterruptedReceive, ReceivingMarker, begin_overwrite, read_receiving_marker
from .superblock import read_superblock_slot, reserved_blocks, write_superblock

if TYPE_CHECKING:
    from .receiveside import ReceiveSide

@dataclass(frozen=True)
class IncomingImage:
    """What the volume needs to know of an image it receives (its stream header)."""

    block_size: int
    nblocks: int
    virtual_blocks: int
    volume_uuid: bytes
    first_data_vbn: int
    next_id: int
    root: RootRecord
    stream_id: bytes
    expression: str
    top_guid: bytes
    top_name: str
    base_guid: bytes | None
    image_digest: int
    image_blocks: int
    keep: frozenset[bytes]          # guids of the source's snapshots when it was sent

    def superblock(self) -> Superblock:
        return Superblock(self.block_size, self.nblocks, self.virtual_blocks, self.volume_uuid,
                          self.first_data_vbn, self.next_id, self.root)


@dataclass
class ReceiveOutcome:
    """What a commit decided: snapshots released here, and those left incomplete."""

    released: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    freed: int = 0                   # blocks the commit made free here (deallocations)


def interrupted_here(dev: BlockDevice, image: IncomingImage, resuming: bool) -> bool:
    """Does `dev` hold an interrupted full receive of this very stream (so that it
    may be written again without --force)?"""
    st = LocalArea(dev, image.block_size, image.nblocks).read(0)
    if resuming and st.pending and st.stream_id == image.stream_id:
        return True
    marker = read_receiving_marker(dev)
    return marker is not None and marker.stream_id == image.stream_id


class Receiver:
    """Places one incoming image on a target and commits its root."""

    def __init__(self, dev: BlockDevice, image: IncomingImage, vol: ReceiveSide | None):
        self.dev, self.image, self.vol = dev, image, vol
        if vol is not None:
            self.area, self.slot, self.local = vol.local_area, vol.slot, vol.local
        else:
            self.area = LocalArea(dev, image.block_size, image.nblocks)
            self.slot, self.local = 1, self.area.read(0)
        bits_per_block = 8 * image.block_size
        self.nbits = -(-image.nblocks // bits_per_block) * bits_per_block
        self.doomed = empty_plane(self.nbits)
        self.dooming: list[SnapshotEntry] = []   # released at the commit, not yet reused
        self.spared: dict[str, bitarray] = {}    # ... but a send began to hold them
        self.busy, self.valid = self._planes()
        # what the volume's allocator held busy when this receive began: a block busy
        # there now and not then was allocated here meanwhile (see Allocator.claim)
        self.before = vol.busy_now() if vol is not None else None
        self.generation = vol.generation if vol is not None else 0
        self.received = empty_plane(self.nbits)
        self.freed = empty_plane(self.nbits)
        self.touched = False             # blocks (or the marker) may have been written
        self.resumed = False
        self.committed = False
        self.offered = False             # an interrupted receive the volume offers to resume
        self._io: BlockIO | None = None

    @classmethod
    def for_device(cls, dev: BlockDevice, image: IncomingImage,
                   carry: dict[str, bytes] | None = None) -> Receiver:
        """A receiver writing a full image over `dev`, whatever it holds (the caller
        has checked that it may). `carry`: the local properties of the volume it
        replaces that this copy keeps (a middle host's registry of destinations and
        their holds): saved with the receive's progress and committed with the new
        root, holds only on snapshots the new root holds whole."""
        r = cls(dev, image, None)
        if carry is not None:
            r.local.props = dict(carry)
        return r

    # -- the target as the stream sees it --------------------------------------------------
    def _planes(self) -> tuple[bitarray, bitarray]:
        """Blocks the target still uses (no incoming block may land there), and blocks
        it holds valid (the complete snapshots the image keeps), each plane loaded
        once. The blocks an incomplete snapshot lacks hold nothing: a stream may fill
        them."""
        busy, valid = empty_plane(self.nbits), empty_plane(self.nbits)
        busy[:self.image.first_data_vbn] = 1
        busy[self.image.nblocks:] = 1
        if self.vol is not None:
            busy |= self.vol.active.bits
            for e in self.vol.snapshots():
                if e.shadow or e.incomplete:
                    continue
                if e.guid in self.image.keep:
                    valid |= self.vol.plane(e.name)
                elif self.vol._held.get(e.id):   # being sent (a child's pull): untouched
                    busy |= self.vol.plane(e.name)
                else:                    # the source dropped it: released at the commit
                    self.doomed |= self.vol.plane(e.name)
                    self.dooming.append(e)
            busy |= valid
        return busy, valid

    def snapshots(self) -> list[SnapshotEntry]:
        """The target's snapshots (their names, guids, flags) before the commit."""
        return self.vol.snapshots() if self.vol is not None else []

    def resumable(self) -> bitarray | None:
        """The VBNs an interrupted receive of this stream already placed, if any."""
        st = self.local
        if st.pending and st.stream_id == self.image.stream_id and st.received is not None:
            return st.received
        return None

    # -- placing blocks ---------------------------------------------------------------------
    def begin(self, *, resume: bool) -> None:
        """Start placing blocks: continue an interrupted receive of this stream, or
        (a full image) mark the target as being overwritten."""
        im = self.image
        if resume:
            received = self.resumable()
            if received is None:
                raise StreamError(f"{self.dev.path} has no interrupted receive of this stream "
                                  "to resume; send it again without --resume")
            # a copy: the volume's local state keeps naming only blocks known durable
            self.received, self.resumed = received.copy(), True
            if self.vol is not None:          # placed earlier: no allocation may take them
                try:
                    self.vol.claim_placed(self.received, im.stream_id)
                except StreamError:
                    self._forget_progress()   # the next attempt starts over
                    raise
        self.touched = True
        if self.vol is None and not resume:
            self._begin_overwrite()
        self._io = BlockIO(self.dev, im.block_size)
        if not resume and self.local.pending:
            # the progress of another stream, whose blocks this one may overwrite:
            # recorded as this stream's (none yet) before the first block lands
            self.save_progress()

    def _begin_overwrite(self) -> None:
        """The receiving marker replaces the old superblocks (in an order a kill cannot
        break) and no old local state survives."""
        im = self.image
        try:
            current: tuple[Superblock, int] | None = read_superblock_slot(self.dev)
        except (FormatError, InterruptedReceive):
            current = None
        marker = ReceivingMarker(im.block_size, im.nblocks, im.stream_id, im.volume_uuid,
                                 im.top_guid, im.image_blocks, im.top_name)
        begin_overwrite(self.dev, marker,
                        reserved_blocks(im.nblocks, im.block_size) * im.block_size, current)

    def place(self, vbn: int, count: int, payload: bytes | memoryview, where: str) -> None:
        """Write `count` blocks at `vbn`, which must be free in the committed state and
        not received already (`where` names the record for the error)."""
        assert self._io is not None, "begin() comes first"
        lo, hi = vbn, vbn + count
        if hi > self.image.nblocks:
            raise StreamError(f"stream writes block {hi - 1}, beyond the volume ({where})")
        if self.received.count(1, lo, hi):
            raise StreamError(f"stream repeats block {self.received.find(1, lo, hi)} ({where})")
        if self.vol is not None:
            with self.vol._lock:            # against a send starting, a local allocation
                self._take(lo, hi, where)
        else:
            self._check_free(lo, hi, where)
        view = self._io.write_buffer(len(payload))
        view[:] = payload
        self._io.write_runs([(lo, count)], view, wait=False)
        self.received[lo:hi] = 1

    def _check_free(self, lo: int, hi: int, where: str) -> None:
        if not self.busy.count(1, lo, hi):
            return
        at = self.busy.find(1, lo, hi)
        sent = sorted(n for n, plane in self.spared.items() if plane[at])
        if sent:
            self.save_progress()
            raise StreamError(f"{self.dev.path}: snapshot {sent[0]!r}, which this stream "
                              "releases, is being sent from here; the next attempt completes "
                              "the receive once that send has ended")
        raise StreamError(f"stream writes block {at}, which the target still uses ({where}); "
                          "it does not continue what the target holds")

    def _take(self, lo: int, hi: int, where: str) -> None:
        """Under the volume lock: check the blocks are free for this receive now, start
        reusing the blocks of the snapshots it releases if these are some, and claim
        them against local allocations."""
        assert self.vol is not None and self.before is not None
        if self.dooming and self.doomed.count(1, lo, hi):
            self._release_doomed()
        self._check_free(lo, hi, where)
        self.vol.claim(lo, hi, self.before)

    def _release_doomed(self) -> None:
        """The first block landing on one a snapshot the source dropped still holds
        here (under the volume lock). A snapshot a send began to hold since this
        receive began keeps its blocks (they are busy now; the commit waits for
        the send). The others are recorded as released first (durably, with what
        was received so far), so that if this receive never commits, the root
        still in force does not offer a snapshot whose blocks were overwritten,
        and this volume stops offering them now: no send may start on them. They
        would be released by the commit anyway (the source no longer has them)."""
        assert self.vol is not None
        vol, gone = self.vol, []
        for e in self.dooming:
            if vol._held.get(e.id):
                plane = vol.plane(e.name)
                self.spared[e.name] = plane
                self.busy |= plane
            else:
                gone.append(e)
        self.dooming = []
        self.doomed &= ~self.busy
        self.local.released |= {e.guid for e in gone}
        vol.reusing(gone)
        self.save_progress()

    def apply_deallocations(self, runs: list[tuple[int, int]]) -> None:
        """Blocks the base held that the top no longer uses. Checked at the commit (the
        top's root must not use them); after it they are free here unless a
        snapshot the image keeps still holds them."""
        for vbn, count in runs:
            if vbn + count > self.image.nblocks:
                raise StreamError(f"stream deallocates block {vbn + count - 1}, beyond the "
                                  "volume")
            self.freed[vbn:vbn + count] = 1

    def save_progress(self, *, quiet: bool = False) -> None:
        """Make the blocks placed so far durable, then record them (for resume) in the
        local state, which the volume also writes (its properties): it only ever
        names blocks already on the device."""
        try:
            assert self._io is not None
            self._io.drain()
            self.dev.flush()
            if self.vol is None:
                self._record()
            else:
                with self.vol._lock:
                    self._record()
        except (BlockxferError, OSError):
            if not quiet:
                raise

    def offer_resume(self) -> None:
        """An interrupted receive into an open volume (a served one, after
        `save_progress`): from now on the volume offers it for resume (its look, and
        a receive of this stream again), as it would once opened again, unless it
        was committed meanwhile. Its blocks stay claimed (no local write lands
        there) until the volume takes another root: the resume's commit, or
        `revert_to_received`, which drops the offer (a volume changed since its
        last receive goes back first, so a resume never trusts a stale plane)."""
        st = self.local
        if self.vol is not None and st.pending and st.received is not None \
                and self.vol.generation == st.root_generation:
            self.offered = True               # its local state is the volume's already
            self.vol.offer_claims(self.image.stream_id)

    def _forget_progress(self) -> None:
        """Blocks the interrupted receive placed were taken here since: its progress
        names data no longer there, and is dropped."""
        assert self.vol is not None
        with self.vol._lock:
            st = self.local
            st.stream_id, st.received, st.received_blocks = bytes(16), None, 0
            self.area.write(st)

    def _record(self) -> None:
        im, st = self.image, self.local
        st.root_generation = self.generation
        st.stream_id, st.top_guid = im.stream_id, im.top_guid
        st.base_guid, st.image_digest = im.base_guid or bytes(16), im.image_digest
        st.image_blocks = im.image_blocks
        st.received = self.received.copy()
        st.received_blocks = st.received.count()
        self.area.write(st)

    def finish(self) -> None:
        """All blocks placed: make them durable."""
        if self._io is not None:
            self._io.drain()
            self.dev.flush()

    def close(self) -> None:
        """Stop placing blocks (after a commit, or abandoning the receive)."""
        if self._io is not None:
            self._io.close()
            self._io = None
        if self.vol is not None and not self.committed and not self.offered:
            self.vol.release_claims()

    # -- committing ---------------------------------------------------------------------------
    def commit(self) -> ReceiveOutcome:
        """Decide what is complete and released, record it, then write the new root:
        the last write, so a kill before it leaves the target as it was."""
        self._refuse_while_sent()
        self.finish()
        if self._io is not None:
            self._io.close()
            self._io = None
        im = self.image
        if self.received.count() != im.image_blocks:
            raise StreamError(f"stream ended with {self.received.count()} of "
                              f"{im.image_blocks} blocks; send the image again")
        have = self.received | self.valid
        top_plane = self._foreign_top_plane(have)
        used = (self.freed & top_plane).find(1)
        if used >= 0:
            raise StreamError(f"stream deallocates block {used}, which its top "
                              f"{im.top_name!r} still uses; the stream contradicts itself")
        released, incomplete, whole = self._decide(have)
        if any(e.guid == im.top_guid for e in incomplete):
            raise StreamError(f"stream does not carry all blocks of its top {im.top_name!r}")
        props = self.local.props if self.vol is not None else _holds_on(self.local.props, whole)
        state = LocalState(self.local.seq, im.root.generation,
                           incomplete={e.guid for e in incomplete},
                           released={e.guid for e in released}, props=props)
        sb = im.superblock()
        freed = 0
        if self.vol is not None:
            freed = self.vol.adopt_foreign_root(sb, state, self.generation)
        else:
            commit_foreign_root(self.dev, sb, self.slot, self.area, state)
        self.committed = True
        return ReceiveOutcome([e.name for e in released], [e.name for e in incomplete], freed)

    def _refuse_while_sent(self) -> None:
        """A snapshot this image releases but that is being sent from here (a child's
        pull on a middle host, a send) would lose its blocks under the reader at the
        commit: the receive is kept (its blocks saved for the resume) and refused,
        and the next attempt completes it once the send has ended."""
        if self.vol is None:
            return
        sent = sorted(e.name for e in self.vol.snapshots()
                      if self.vol._held.get(e.id) and e.guid not in self.image.keep)
        if sent:
            self.save_progress()
            raise StreamError(f"{self.dev.path}: snapshot {', '.join(map(repr, sent))}, which "
                              "this stream releases, is being sent from here; the next "
                              "attempt completes the receive once that send has ended")

    def _decide(self, have: bitarray) -> tuple[list[SnapshotEntry], list[SnapshotEntry],
                                               set[bytes]]:
        """The foreign catalog's snapshots released here (not kept by the source),
        those this target does not hold whole (incomplete), and the guids of those it
        holds whole."""
        from .volume import Volume
        cand = Volume(self.dev, self.image.superblock(), writable=False, slot=self.slot)
        try:
            keep = self.image.keep
            released = [e for e in cand.catalog.snapshots if e.guid not in keep]
            incomplete = [e for e in cand.catalog.snapshots if e.guid in keep and not e.shadow
                          and (cand.plane(e.name) & ~have).any()]
        finally:
            cand.io.close()
        lacking = {e.guid for e in incomplete}
        whole = {e.guid for e in cand.catalog.snapshots
                 if e.guid in keep and not e.shadow and e.guid not in lacking}
        return released, incomplete, whole

    def _foreign_top_plane(self, have: bitarray) -> bitarray:
        """The top's plane from the foreign root, refusing a partial image (one that
        lacks blocks of its top, e.g. an old stream of `june1 & june3`) before
        anything reads a block it never wrote: such a block is missing, not damaged,
        and no checksum error may say otherwise."""
        im = self.image

        def partial(what: str) -> StreamError:
            return StreamError(f"image {im.expression!r} is partial, not restorable: it lacks "
                               f"{what} of its top {im.top_name!r} (missing, not damaged); "
                               "send an image that holds its top's blocks")

        def read_block(vbn: int, ck: int) -> bytes:
            if not have[vbn]:
                raise partial(f"metadata block {vbn}")
            return io.read_block(vbn, ck)

        def read_many(rows: np.ndarray) -> bytes:
            absent = [int(v) for v in rows[:, 0] if not have[int(v)]]
            if absent:
                raise partial(f"{len(absent)} metadata blocks (from {absent[0]})")
            return io.read_many(rows)

        io = BlockIO(self.dev, im.block_size)
        try:
            cat = Catalog.unpack(BlobObject(im.root.catalog, im.block_size, read_block,
                                            read_many).load())
            top = next((e for e in cat.snapshots if e.guid == im.top_guid), None)
            if top is None:
                raise StreamError(f"the stream's catalog does not list its top {im.top_name!r}")
            plane = PlaneObject(top.plane, im.nblocks, im.block_size, read_block,
                                read_many).bits
            lacking = (plane & ~have).count()
            if lacking:
                raise partial(f"{lacking} blocks")
            return plane
        finally:
            io.close()


def _holds_on(props: dict[str, bytes], whole: set[bytes]) -> dict[str, bytes]:
    """`props` with holds only on the snapshots in `whole` (a hold on a snapshot the
    new root does not hold whole keeps nothing)."""
    raw = props.get(HOLDS)
    if not raw:
        return props
    table = {g: t for g, t in json.loads(raw).items() if bytes.fromhex(g) in whole and t}
    out = {k: v for k, v in props.items() if k != HOLDS}
    if table:
        out[HOLDS] = json.dumps(table, separators=(",", ":")).encode()
    return out


def commit_foreign_root(dev: BlockDevice, sb: Superblock, slot: int, area: LocalArea,
                        state: LocalState) -> None:
    """What only this copy knows first, then the superblock naming the foreign
    root into the slot not in force: the last write of a receive."""
    area.write(state)
    write_superblock(dev, sb, 1 - slot)
