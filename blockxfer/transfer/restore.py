"""Restoring from tape: the image's stream is read back record by record (across
the tapes of its set) and applied by the ordinary, atomic receive.

Without --image, the first image that starts on the tape is restored; with
--snapshot, the image whose top is that snapshot, after the images it needs as
bases (the patent's level order: full, then incrementals).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from blockxfer.device import BlockDevice
from blockxfer.errors import (
    BlockxferError,
    DeviceError,
    FormatError,
    NotFound,
    StreamError,
    UsageError,
    VolumeError,
)
from blockxfer.stream.decode import parse_record
from blockxfer.stream.receive import ReceiveResult, receive_stream
from blockxfer.tape import EndOfData, Tape

from . import tapefmt as tf
from .tapeset import ImageOnTape, NextTape, OpenTape, TapeContents, list_tape, read_label

OpenDevice = Callable[..., BlockDevice]
Receive = Callable[..., ReceiveResult]       # receive_stream's signature


class TapeImageReader:
    """A read-only file over one image's stream, following it across tapes."""

    def __init__(self, tape: Tape, contents: TapeContents, image: ImageOnTape,
                 open_tape: OpenTape, next_tape: NextTape | None):
        self.tape, self.contents, self.image = tape, contents, image
        self.open_tape, self.next_tape = open_tape, next_tape
        self.rs = contents.label.record_size
        self.buf = b""
        self.record = 0
        self.done = False
        self._position(image)

    def _where(self) -> str:
        return (f"{self.tape.path} (tape {self.contents.label.seq} of set "
                f"{self.contents.label.set_name!r}), file {self.image.file}, record {self.record}")

    def _position(self, image: ImageOnTape) -> None:
        self.image, self.record = image, 0
        self.tape.rewind()
        self.tape.space_filemarks(image.file)
        kind, *_ = tf.unpack_record(self._read(), self._where())
        if kind != tf.DESCRIPTOR:
            raise FormatError(f"{self._where()}: expected the image descriptor")

    def _read(self) -> bytes:
        try:
            raw = self.tape.read_record(self.rs)
        except EndOfData as e:
            raise StreamError(f"{self._where()}: the image ends early (end of data)") from e
        except DeviceError as e:
            raise StreamError(f"{self._where()}: read error: {e}") from e
        self.record += 1
        return raw

    def _next_chunk(self) -> bytes:
        raw = self._read()
        if raw == b"":                       # end of this part
            if self.image.index is None:
                raise StreamError(f"{self._where()}: this dump never finished (incomplete)")
            if self.image.index.complete:
                self.done = True
                return b""
            self._next_part()
            return self._next_chunk()
        kind, _, _, _, payload = tf.unpack_record(raw, self._where())
        if kind != tf.DATA:
            raise FormatError(f"{self._where()}: expected a data record")
        return payload

    def _next_part(self) -> None:
        label = self.contents.label
        if self.next_tape is None:
            raise StreamError(f"the image continues on tape {label.seq + 1} of set "
                              f"{label.set_name!r}; give --next-tape")
        self.tape.close()
        self.tape = self.open_tape(self.next_tape(label.set_name, label.seq + 1), False)
        contents = list_tape(self.tape)
        if contents.label.set_id != label.set_id or contents.label.seq != label.seq + 1:
            raise StreamError(f"{self.tape.path} is tape {contents.label.seq} of set "
                              f"{contents.label.set_name!r}; tape {label.seq + 1} of set "
                              f"{label.set_name!r} is needed")
        cont = next((i for i in contents.images
                     if i.descriptor.image_id == self.image.descriptor.image_id
                     and i.descriptor.part == self.image.descriptor.part + 1), None)
        if cont is None:
            raise StreamError(f"{self.tape.path} does not continue image "
                              f"{self.image.descriptor.expression!r}")
        self.contents = contents
        self._position(cont)

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self.buf) < n) and not self.done:
            self.buf += self._next_chunk()
        if n < 0:
            n = len(self.buf)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def seekable(self) -> bool:
        return False


def pick_image(contents: TapeContents, image: int | None, snapshot: str | None) -> ImageOnTape:
    images = contents.images
    if image is not None:
        found = next((i for i in images if i.number == image), None)
        if found is None:
            raise NotFound(f"tape holds images 1..{len(images)}; there is no image {image}")
    elif snapshot is not None:
        found = next((i for i in reversed(images) if i.descriptor.top == snapshot
                      and i.complete), None)
        if found is None:
            raise UsageError(f"no complete image on this tape has {snapshot!r} as its top")
    else:
        found = next((i for i in images if i.descriptor.part == 0), None)
        if found is None:
            raise UsageError("no image starts on this tape")
    if found.descriptor.part != 0:
        raise UsageError(f"image {found.number} continues one from an earlier tape; restore "
                         "from the tape where it starts")
    if found.index is None or found.index.abandoned:
        raise UsageError(f"image {found.number} ({found.descriptor.expression!r}) is incomplete: "
                         "its dump never finished")
    return found


@dataclass
class RestoreStep:
    image: int
    result: ReceiveResult


def restore_chain(contents: TapeContents, target_has: Callable[[str], bool],
                  chosen: ImageOnTape) -> list[ImageOnTape]:
    """The images to apply, oldest first: bases the target lacks come first."""
    chain = [chosen]
    while (base := chain[0].descriptor.base) is not None and not target_has(base):
        prior = next((i for i in reversed(contents.images) if i.descriptor.top == base
                      and i.complete and i.number < chain[0].number), None)
        if prior is None:
            raise StreamError(f"image {chain[0].number} needs base snapshot {base!r}, which "
                              "the target lacks and this tape does not hold")
        chain.insert(0, prior)
    return chain


RETRY = ("run the same restore again, with the set's tapes at hand (--next-tape COMMAND "
         "or --changer)")


def _refuse_spanning(contents: TapeContents, chain: list[ImageOnTape]) -> None:
    """Plan first: an image that continues on the next tape cannot be restored
    without a way to ask for it, so say so before the target is touched."""
    for img in chain:
        if img.index is not None and not img.index.complete:
            label = contents.label
            raise UsageError(f"image {img.number} ({img.descriptor.expression!r}) continues "
                             f"on tape {label.seq + 1} of set {label.set_name!r}; give "
                             "--next-tape COMMAND (or --changer) so restore can ask for it; "
                             "nothing was written")


def plan_restore(tape_path: str, *, open_tape: OpenTape, image: int | None = None,
                 snapshot: str | None = None,
                 target_has: Callable[[str], bool] = lambda name: False) -> list[ImageOnTape]:
    """The images `restore_images` would apply, oldest first; reads only the tape's
    label and index (restore -n)."""
    tape = open_tape(tape_path, False)
    try:
        return _chain_on(tape, tape_path, image, snapshot, target_has)[1]
    finally:
        tape.close()


def _chain_on(tape: Tape, tape_path: str, image: int | None, snapshot: str | None,
              target_has: Callable[[str], bool]) -> tuple[TapeContents, list[ImageOnTape]]:
    """The tape's images, and those a restore of the chosen one applies, oldest first."""
    if read_label(tape) is None:
        raise FormatError(f"{tape_path} is blank")
    contents = list_tape(tape)
    chosen = pick_image(contents, image, snapshot)
    return contents, restore_chain(contents, target_has, chosen) if snapshot else [chosen]


def restore_images(tape_path: str, target: str, *, open_tape: OpenTape,
                   open_device: OpenDevice, next_tape: NextTape | None = None,
                   image: int | None = None, snapshot: str | None = None, force: bool = False,
                   target_has: Callable[[str], bool] = lambda name: False,
                   progress: Callable[[int], None] | None = None,
                   receive: Receive = receive_stream) -> list[RestoreStep]:
    """Apply the chosen image (and the bases it needs) to `target`. `receive` is
    how a stream reaches the target (a service passes one into its open volume)."""
    tape = open_tape(tape_path, False)
    try:
        contents, chain = _chain_on(tape, tape_path, image, snapshot, target_has)
        if next_tape is None:
            _refuse_spanning(contents, chain)
        steps = []
        for img in chain:
            reader = TapeImageReader(tape, contents, img, open_tape, next_tape)
            try:
                res = receive(reader, target, open_device,
                              force=force, retry=RETRY, progress=progress)
            except BlockxferError:
                tape = reader.tape
                raise
            tape = reader.tape
            steps.append(RestoreStep(img.number, res))
            force = False
        return steps
    finally:
        tape.close()


def verify_image(tape_path: str, image: int, *, open_tape: OpenTape,
                 next_tape: NextTape | None = None) -> dict[str, object]:
    """Read an image back from tape and check every checksum and the digest."""
    from blockxfer.stream.inspect import inspect_stream
    tape = open_tape(tape_path, False)
    try:
        contents = list_tape(tape)
        reader = TapeImageReader(tape, contents, pick_image(contents, image, None), open_tape,
                                 next_tape)
        try:
            return inspect_stream(reader)
        finally:
            tape = reader.tape
    finally:
        tape.close()


@dataclass
class PartialResult:
    blocks: int
    records_read: int


def check_range_target(target: str, img: ImageOnTape, open_device: OpenDevice) -> None:
    """Raw blocks at their VBNs repair only the volume the image came from: refuse
    any other target (another volume, a plain file) before writing anything."""
    import os

    from blockxfer.volume import read_superblock
    desc = img.descriptor
    why = ("--vbns writes raw blocks at their VBNs, which only repairs the volume the "
           f"image came from ({desc.volume}); give --force to write them there anyway")
    if not os.path.exists(target):
        raise NotFound(f"{target} does not exist; {why}")
    dev = open_device(target)
    try:
        sb = read_superblock(dev)
    except (FormatError, VolumeError) as e:
        raise VolumeError(f"{target} is not a blockxfer volume ({e}); {why}") from e
    finally:
        dev.close()
    if sb.uuid_str != desc.volume or sb.block_size != desc.block_size:
        raise VolumeError(f"{target} is volume {sb.uuid_str} ({sb.block_size}-byte blocks), "
                          f"not volume {desc.volume} ({desc.block_size}-byte blocks); {why}")


def restore_range(tape_path: str, target: str, image: int, first: int, last: int, *,
                  open_tape: OpenTape, open_device: OpenDevice,
                  force: bool = False) -> PartialResult:
    """Write blocks first..last (VBNs) of an image to the same VBNs of `target`,
    reading only the tape records that hold them (LOCATE when the drive has it,
    filemark and record spacing when it does not). Without `force` the target must
    be the volume the image came from."""
    tape = open_tape(tape_path, False)
    try:
        contents = list_tape(tape)
        img = pick_image(contents, image, None)
        idx = img.index
        assert idx is not None
        if not force:
            check_range_target(target, img, open_device)
        per = contents.label.record_size - tf.REC.size
        wanted = sorted({r for r in idx.records if r[0] <= last and r[0] + r[1] > first},
                        key=lambda r: r[2])
        if not wanted:
            raise UsageError(f"image {image} holds no block between {first} and {last} on "
                             "this tape")
        dev = open_device(target, write=True)
        try:
            done = reads = 0
            for vbn, count, offset in wanted:
                raw, n = _stream_record_at(tape, img, idx, offset, per, contents)
                reads += n
                rec = parse_record(raw, img.descriptor.block_size)
                if rec is None or (rec.vbn, rec.count) != (vbn, count):
                    raise FormatError(f"{tape_path}: the location table does not match the "
                                      f"record at stream offset {offset}")
                done += _write_range(dev, rec, first, last)
            dev.flush()
            return PartialResult(done, reads)
        finally:
            dev.close()
    finally:
        tape.close()


def _stream_record_at(tape: Tape, img: ImageOnTape, idx: tf.Index, offset: int, per: int,
                      contents: TapeContents) -> tuple[bytes, int]:
    from blockxfer.stream import format as fmt
    k, skip = divmod(offset - idx.stream_start, per)
    if idx.position >= 0 and tape.can_locate:
        tape.locate(idx.position + 1 + k)
    else:
        tape.rewind()
        tape.space_filemarks(img.file)
        tape.space_records(1 + k)
    where = f"{tape.path} file {img.file} record {1 + k}"
    buf, reads, need = b"", 0, fmt.RECORD.size
    while len(buf) < skip + need:
        raw = tape.read_record(contents.label.record_size)
        reads += 1
        if raw == b"":
            raise FormatError(f"{where}: the image ends inside a record")
        kind, _, _, _, payload = tf.unpack_record(raw, where)
        buf += payload
        if len(buf) >= skip + fmt.RECORD.size and need == fmt.RECORD.size:
            length = fmt.RECORD.unpack_from(buf, skip)[4]
            need = fmt.RECORD.size + length + fmt.CHECK.size
    return buf[skip:skip + need], reads


def _write_range(dev: BlockDevice, rec: object, first: int, last: int) -> int:
    from blockxfer.stream.decode import Data
    from blockxfer.volume.blockio import aligned
    assert isinstance(rec, Data)
    bs = len(rec.payload) // rec.count
    lo, hi = max(first, rec.vbn), min(last + 1, rec.vbn + rec.count)
    n = (hi - lo) * bs
    buf = aligned(n)
    buf[:n] = rec.payload[(lo - rec.vbn) * bs:(hi - rec.vbn) * bs]
    dev.pwrite(memoryview(buf)[:n], lo * bs)
    return hi - lo
