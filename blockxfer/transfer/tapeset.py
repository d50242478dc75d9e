"""Tapes of a set: labels, listing what a tape holds, and asking for the next one.

The core never opens a device: the CLI passes `open_tape(path, write) -> Tape` and
`next_tape(set_name, seq) -> path` (a command, the terminal, or a changer).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blockxfer.errors import DeviceError, FormatError, VolumeError, WriteProtected
from blockxfer.tape import EndOfData, Tape

from . import tapefmt as tf

OpenTape = Callable[[str, bool], Tape]
NextTape = Callable[[str, int], str]


@dataclass
class ImageOnTape:
    number: int                    # 1-based, in tape order
    file: int                      # tape file of its data
    descriptor: tf.Descriptor
    index: tf.Index | None         # None: the dump never finished this part

    @property
    def complete(self) -> bool:
        return self.index is not None and self.index.complete

    def as_dict(self) -> dict[str, object]:
        d = self.descriptor
        return {"image": self.number, "file": self.file, "expression": d.expression,
                "top": d.top, "base": d.base, "level": "incremental" if d.base else "full",
                "snapshots": d.snapshots, "blocks": d.blocks, "part": d.part,
                "bytes": self.index.total if self.index and self.index.complete else None,
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d.written)),
                "complete": self.complete,
                "continues": bool(self.index and not self.index.complete
                                  and not self.index.abandoned)}


@dataclass
class TapeContents:
    label: tf.Label
    images: list[ImageOnTape] = field(default_factory=list)
    files: int = 1                 # files on the tape, label included


def label_reader(open_tape: OpenTape) -> Callable[[str], tuple[str, int] | None]:
    """What a changer asks of each tape it loads: (set name, sequence number) of the
    tape at a path, read-only, or None for a blank tape."""
    def read(path: str) -> tuple[str, int] | None:
        tape = open_tape(path, False)
        try:
            label = read_label(tape)
        finally:
            tape.close()
        return None if label is None else (label.set_name, label.seq)
    return read


def read_label(tape: Tape) -> tf.Label | None:
    """The label at BOT, or None for a blank tape; refuses a tape holding other data."""
    tape.rewind()
    try:
        raw = tape.read_record(tf.LABEL_SIZE)
        if raw == b"":                  # a lone filemark at BOT (drives without ERASE)
            tape.read_record(tf.LABEL_SIZE)
            raise FormatError(f"{tape.path} holds data after an empty first file")
    except EndOfData:
        return None
    except DeviceError as e:
        raise FormatError(f"{tape.path} holds data that is not a blockxfer tape ({e})") from e
    try:
        return tf.Label.unpack(raw)
    except FormatError as e:
        raise FormatError(f"{tape.path} holds data that is not a blockxfer tape; "
                          "label it with 'blockxfer tape label --force' to reuse it") from e


def write_label(tape: Tape, serial: str, set_name: str, set_id: bytes, seq: int,
                record_size: int) -> tf.Label:
    if tape.status().write_protected:
        raise WriteProtected(f"{tape.path} is write-protected; use another tape or slide the tab")
    label = tf.Label(serial, set_name, set_id, seq, record_size, int(time.time()))
    tape.rewind()
    tape.write_record(label.pack())
    tape.write_filemarks(1)
    return label


def label_tape(tape: Tape, name: str, *, set_name: str | None = None, force: bool = False,
               record_size: int = tf.DEFAULT_RECORD) -> tf.Label:
    """Label a blank tape (or, with force, anything) as the first tape of a new set."""
    if not force:
        try:
            old = read_label(tape)
        except FormatError as e:
            raise VolumeError(f"{e}") from e
        if old is not None:
            raise VolumeError(f"{tape.path} is already labelled {old.serial!r} (set "
                              f"{old.set_name!r}); use --force to relabel and lose its images")
    return write_label(tape, name, set_name or name, os.urandom(16), 1, record_size)


def list_tape(tape: Tape) -> TapeContents:
    """Read the label, every image's descriptor and index; space over the data."""
    label = read_label(tape)
    if label is None:
        raise FormatError(f"{tape.path} is blank (no label)")
    out = TapeContents(label)
    rs = label.record_size
    tape.space_filemarks(1)
    file, pending = 1, None
    while True:
        try:
            raw = pending or tape.read_record(rs)
        except EndOfData:
            break
        pending = None
        if raw == b"":                              # an empty file: skip
            file += 1
            continue
        kind, _, _, _, payload = tf.unpack_record(raw, f"{tape.path} file {file}")
        if kind != tf.DESCRIPTOR:
            raise FormatError(f"{tape.path} file {file}: expected an image descriptor")
        img = ImageOnTape(len(out.images) + 1, file, tf.Descriptor.unpack(payload), None)
        out.images.append(img)
        tape.space_filemarks(1)
        file += 1
        try:
            first = tape.read_record(rs)
        except EndOfData:
            break
        if first == b"":
            file += 1
            continue
        kind, *_ = tf.unpack_record(first, f"{tape.path} file {file}")
        if kind == tf.DESCRIPTOR:                   # no index: that dump never finished
            pending = first
            continue
        img.index = _read_index(tape, first, rs, f"{tape.path} file {file}")
        file += 1
    out.files = file
    return out


def _read_index(tape: Tape, first: bytes, rs: int, where: str) -> tf.Index | None:
    """The part's index; None when it was cut short (the dump stopped while writing
    it, e.g. at the end of medium): the image is then listed as incomplete, and the
    tape stays listable and appendable."""
    parts, raw = [], first
    while raw:
        kind, _, _, _, payload = tf.unpack_record(raw, where)
        if kind != tf.INDEX:
            raise FormatError(f"{where}: expected index records")
        parts.append(payload)
        try:
            raw = tape.read_record(rs)
        except EndOfData:
            break
    try:
        return tf.Index.unpack(b"".join(parts))
    except FormatError:
        return None
