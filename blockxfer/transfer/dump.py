"""Dumping an image to tape: the stream packed into fixed records, a location table
after it, and continuation onto the next tape of the set at early warning.

A writer thread owns the tape: the sender fills records while the previous ones
are written (double buffering keeps the drive streaming; st has one command in
flight per drive, so throughput is record size / per-command time).

The stream is copied once, straight into the record's buffer after its header;
the writer fills the header in and hands the buffer back for reuse. Under the
test bed's emulated CPU every further copy of 256 KiB cost as much as the
drive's own work for the record (issue 15: dump vs dd).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from blockxfer.catalog import hooks as catalog
from blockxfer.errors import DamagedBlock, EndOfMedium, FormatError, VolumeError, WriteProtected
from blockxfer.image import evaluate, require_restorable
from blockxfer.stream import format as fmt
from blockxfer.stream.send import Reader, check_top_and_base, send_image
from blockxfer.tape import EarlyWarning, Tape
from blockxfer.volume import Volume

from . import tapefmt as tf
from .tapeset import NextTape, OpenTape, list_tape, read_label, write_label

QUEUE_RECORDS = 8
SLACK = 64 << 10               # the medium's own overhead per record and filemark, generously


def min_early_warning(record_size: int) -> int:
    """The smallest early-warning zone spanning works in: when early warning is
    reported the record that crossed into the zone is on tape, and the part's end
    (a filemark, its index in one record, a filemark) must still fit."""
    return 2 * record_size + SLACK


def min_capacity(record_size: int, early_warning: int) -> int:
    """The smallest tape a part fits on: the label, a descriptor and one data record
    before the early-warning zone."""
    return early_warning + tf.LABEL_SIZE + 2 * record_size + SLACK


@dataclass
class DumpResult:
    image: int
    tapes: list[str]
    blocks: int
    bytes: int
    set_id: str = ""               # hex: the set the image was written to
    seq: int = 1                   # the set's tape it starts on
    image_id: str = ""


class _Writer:
    """The tape side: takes payload-sized chunks, writes records, spans tapes."""

    def __init__(self, tape: Tape, label: tf.Label, desc: tf.Descriptor,
                 open_tape: OpenTape, next_tape: NextTape | None, entries: list[Any]):
        self.tape, self.label, self.desc = tape, label, desc
        self.open_tape, self.next_tape, self.entries = open_tape, next_tape, entries
        self.rs = label.record_size
        self.key = bytes.fromhex(desc.image_id)
        self.part, self.index, self.part_start, self.offset = 0, 0, 0, 0
        self.rows_done = 0             # location rows already in an index on tape
        self.tapes = [tape.path]
        self.placed: list[tuple[tf.Label, str, int | None]] = []   # (label, path, file) a part
        self.q: queue.Queue[tuple[bytearray, int] | None] = queue.Queue(QUEUE_RECORDS)
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()   # written, reusable
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="tape-writer", daemon=True)

    def _mark_position(self) -> None:
        """Where this part's descriptor goes, for LOCATE at partial restore (one READ
        POSITION per part, never mid-stream)."""
        self.position = self.tape.position() if self.tape.can_locate else -1

    def start(self, file: int) -> None:
        self.placed.append((self.label, self.tape.path, file))
        self._mark_position()
        self._descriptor()
        self.thread.start()

    def _descriptor(self) -> None:
        """The part's first record. Refused at early warning, it goes to the next tape
        (_span writes that part's own): what is left of the zone is kept for the
        part's end (min_early_warning), however small the zone."""
        rec = tf.pack_record(tf.DESCRIPTOR, self.key, self.part, self.index, self.desc.pack(),
                             self.rs)
        try:
            self.tape.write_record(rec)
        except EarlyWarning:
            self._span()
            return
        self.index += 1

    def _data(self, rec: bytearray, valid: int) -> None:
        """A data record filled in place (`_Packer`): its header, then the tape."""
        tf.pack_header_into(rec, tf.DATA, self.key, self.part, self.index, valid)
        try:
            self.tape.write_record(rec)
        except EarlyWarning:
            self._span()                  # the refused record goes to the next tape,
            self._data(rec, valid)        # with that part's header
            return
        self.index += 1
        self.offset += valid

    def _run(self) -> None:
        try:
            while (item := self.q.get()) is not None:
                self._data(*item)
                self.free.put(item[0])
        except BaseException as e:  # handed to the producer
            self.error = e
            while self.q.get() is not None:
                pass

    def _finish_part(self, complete: bool, total: int, abandoned: bool = False) -> None:
        """Filemark, the index, filemark. A part ended at early warning gets an index
        of one record (what the zone is sure to hold); location rows that do not fit
        are carried into the next part's index (they keep their stream offsets)."""
        self.tape.write_filemarks(1)
        upto = self.rows_done
        while upto < len(self.entries) and self.entries[upto][2] < self.offset:
            upto += 1
        idx = tf.Index(self.desc.image_id, self.part, self.part_start, self.offset, complete,
                       total if complete else 0, abandoned, self.position,
                       self.entries[self.rows_done:upto])
        per = self.rs - tf.REC.size
        raw = idx.pack()
        while not complete and len(raw) > per:           # carry the rows that do not fit
            keep = max(0, len(idx.records) * per // len(raw) - 1)
            idx.records = idx.records[:keep]
            raw = idx.pack()
        self.rows_done += len(idx.records)
        self.index = 0
        for k in range(0, max(len(raw), 1), per):
            self._write_past_ew(tf.pack_record(tf.INDEX, self.key, self.part, self.index,
                                               raw[k:k + per], self.rs))
            self.index += 1
        self.tape.write_filemarks(1)

    def _write_past_ew(self, rec: bytes) -> None:
        """Write a record of the part's end: early warning reported on it (the image
        ended just before the zone) lets the next write through, as st does."""
        try:
            self.tape.write_record(rec)
        except EarlyWarning:
            self.tape.write_record(rec)

    def _span(self) -> None:
        """End this tape's part and continue on the next tape of the set."""
        self._finish_part(False, 0, abandoned=self.next_tape is None)
        where = f"{self.tape.path} (set {self.label.set_name!r}, tape {self.label.seq})"
        if self.next_tape is None:
            raise EndOfMedium(f"{where} is full and no next tape was given (--next-tape); "
                              "the dump is listed as incomplete")
        self.tape.close()
        path = self.next_tape(self.label.set_name, self.label.seq + 1)
        self.tape = self.open_tape(path, True)
        self.label = _join_set(self.tape, self.label)
        self.tape.seek_eod()
        self.tapes.append(path)
        file = self.tape.status().file
        self.placed.append((self.label, path, file if file >= 0 else None))
        self.part += 1
        self.part_start, self.index = self.offset, 0
        self.desc.part, self.desc.stream_offset = self.part, self.offset
        self._mark_position()
        self._descriptor()

    def buffer(self) -> bytearray:
        """An empty record: one the writer is done with, or a new one."""
        try:
            return self.free.get_nowait()
        except queue.Empty:
            return bytearray(self.rs)

    def put(self, rec: bytearray, valid: int) -> None:
        """Write `rec`, whose payload (`valid` bytes at REC.size) is in place."""
        if self.error:
            raise self.error
        self.q.put((rec, valid))

    def abort(self) -> None:
        """Stop without an index: the image stays listed as incomplete."""
        self.q.put(None)
        self.thread.join()

    def close(self, total: int) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error
        try:
            self._finish_part(True, total)
        except EndOfMedium as e:
            raise EndOfMedium(f"{e}: the image's index did not fit before the end of "
                              f"{self.tape.path}, so the image is listed as incomplete; dump "
                              "it again on a tape with a larger early-warning zone") from e


def _join_set(tape: Tape, prev: tf.Label) -> tf.Label:
    """The next tape of a set: blank (labelled now) or already labelled as that one."""
    label = read_label(tape)
    if label is None:
        return write_label(tape, f"{prev.set_name}-{prev.seq + 1}", prev.set_name, prev.set_id,
                           prev.seq + 1, prev.record_size)
    if label.set_id != prev.set_id:
        raise VolumeError(f"{tape.path} belongs to set {label.set_name!r}, not "
                          f"{prev.set_name!r}; insert tape {prev.seq + 1} of that set or a blank")
    if label.seq != prev.seq + 1:
        raise VolumeError(f"{tape.path} is tape {label.seq} of set {label.set_name!r}; "
                          f"tape {prev.seq + 1} is needed")
    return label


class _Packer:
    """A file-like sink for send_image: copies the stream into record payloads, in
    place in the records' buffers.

    The copy is numpy's `positive` of the bytes (identity on uint8), not memcpy:
    for copies of 32..256 KiB (a record) glibc picks `rep movsb`, which QEMU's
    TCG (the test bed's emulation) runs a byte at a time; numpy's vector loop took
    half the CPU there (qemu-x86_64 -cpu max) and no more on real CPUs. Assigning
    to a bytearray slice was worse still: from anything but a bytearray it copies
    the bytes into a new one first (issue 15)."""

    def __init__(self, writer: _Writer):
        self.w = writer
        self.rs = writer.rs
        self.rec = writer.buffer()
        self.arr = np.frombuffer(self.rec, dtype=np.uint8)
        self.pos = tf.REC.size           # where the next stream byte goes in self.rec
        self.total = 0

    def write(self, piece: bytes | memoryview) -> int:
        src = np.frombuffer(piece, dtype=np.uint8)
        n, done = len(src), 0
        self.total += n
        while done < n:
            k = min(n - done, self.rs - self.pos)
            np.positive(src[done:done + k], out=self.arr[self.pos:self.pos + k])
            self.pos += k
            done += k
            if self.pos == self.rs:
                self._put(self.rs - tf.REC.size)
        return n

    def _put(self, valid: int, more: bool = True) -> None:
        self.w.put(self.rec, valid)
        if more:
            self.rec, self.pos = self.w.buffer(), tf.REC.size
            self.arr = np.frombuffer(self.rec, dtype=np.uint8)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.pos > tf.REC.size:       # the last record: zero padding (a reused buffer)
            self.arr[self.pos:] = 0
            self._put(self.pos - tf.REC.size, more=False)
            self.pos = tf.REC.size


def _prepare(tape: Tape, label_name: str | None, record_size: int) -> tf.Label:
    if tape.status().write_protected:
        raise WriteProtected(f"{tape.path} is write-protected; nothing was written")
    label = read_label(tape)
    if label is None:
        name = label_name or f"BX{os.urandom(3).hex().upper()}"
        label = write_label(tape, name, name, os.urandom(16), 1, record_size)
    return label


def _note(vol: Volume, desc: tf.Descriptor, number: int, writer: _Writer, total: int) -> None:
    """Tell the catalog where the image went (a failure there is only a warning)."""
    parts: list[tuple[int, catalog.TapeRef | str, int | None]] = [
        (k, catalog.TapeRef(lab.set_id.hex(), lab.set_name, lab.seq, lab.serial, path), file)
        for k, (lab, path, file) in enumerate(writer.placed)]
    path = _abspath(getattr(getattr(vol, "dev", None), "path", None))
    catalog.note_image(catalog.ImageRecord(
        "tape", desc.image_id, vol.uuid, desc.expression, desc.top, desc.base, desc.written,
        desc.blocks, total, desc.snapshots, number, volume_path=path, parts=parts))


def _abspath(path: str | None) -> str | None:
    return os.path.abspath(path) if path and not path.startswith("/dev/") else path


def dump_image(vol: Volume, expression: str, tape_path: str, *, open_tape: OpenTape,
               next_tape: NextTape | None = None, label: str | None = None,
               record_size: int = tf.DEFAULT_RECORD, reader: Reader | None = None,
               compress: bool = True,
               progress: Callable[[int], None] | None = None) -> DumpResult:
    """Append the image to the tape (after its last image), spanning if it must."""
    img = evaluate(expression, vol, vol.block_size)
    top, base = check_top_and_base(img)
    require_restorable(img, vol)             # never a tape image nobody can restore
    tape = open_tape(tape_path, True)
    try:
        lab = _prepare(tape, label, record_size)
        listing = list_tape(tape)
        number = len(listing.images) + 1
        tape.seek_eod()
        desc = tf.Descriptor(os.urandom(16).hex(), expression, top.name,
                             base.name if base else None, [e.name for e in vol.snapshots()],
                             vol.uuid, img.blocks, int(time.time()),
                             block_size=vol.block_size)
        entries: list[tuple[int, int, int]] = []
        writer = _Writer(tape, lab, desc, open_tape, next_tape, entries)
        writer.start(listing.files)
        packer = _Packer(writer)

        def index(rtype: int, offset: int, vbn: int, count: int) -> None:
            if rtype == fmt.DATA:
                entries.append((vbn, count, offset))
        done = False
        try:
            stats = send_image(vol, expression, packer, reader=reader,  # type: ignore[arg-type]
                               compress=compress, progress=progress, index=index)
            packer.close()
            done = True
        finally:
            tape = writer.tape
            if done:
                writer.close(packer.total)   # the index is written only for a whole image
            else:
                writer.abort()
            tape = writer.tape
        _note(vol, desc, number, writer, packer.total)
        return DumpResult(number, writer.tapes, stats.data_blocks, stats.bytes,
                          lab.set_id.hex(), lab.seq, desc.image_id)
    except DamagedBlock:
        raise                                # the volume's damage: exit 3, like a read
    except FormatError as e:
        raise VolumeError(str(e)) from e
    finally:
        tape.close()
