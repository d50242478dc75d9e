"""The catalog rebuilt from the media themselves (media are the truth): a tape's
label, descriptors and indexes; a stream file's header; an object store's
catalogs. Each medium read becomes plain `ImageRecord`s for blockxfer.catalog."""

from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Iterator

from blockxfer.catalog.records import ImageRecord, TapeRef
from blockxfer.errors import FormatError
from blockxfer.stream import format as sfmt
from blockxfer.stream.decode import StreamReader

from .tapeset import TapeContents


def tape_records(contents: TapeContents, path: str,
                 barcode: str | None = None) -> tuple[TapeRef, list[ImageRecord]]:
    """One tape's label and the image parts on it. A part that continues an image
    from an earlier tape names only this tape; importing every tape of the set
    joins the parts (by the image id the descriptors share)."""
    lab = contents.label
    ref = TapeRef(lab.set_id.hex(), lab.set_name, lab.seq, lab.serial, path, barcode)
    out = []
    for img in contents.images:
        d, idx = img.descriptor, img.index
        out.append(ImageRecord(
            "tape", d.image_id, d.volume, d.expression, d.top, d.base, d.written, d.blocks,
            idx.total if idx and idx.complete else None, d.snapshots,
            img.number if d.part == 0 else None,
            # known complete only from the image's last part (its index says so)
            complete=bool(idx and idx.complete and not idx.abandoned),
            parts=[(d.part, ref, img.file)]))
    return ref, out


def header_record(h: sfmt.Header, path: str, written: int, size: int) -> ImageRecord:
    base = h.base.name if h.base else None
    return ImageRecord("file", h.stream_id.hex(), str(uuidlib.UUID(bytes=h.volume_uuid)),
                       h.expression, h.top.name, base, written, h.image_blocks, size,
                       [s.name for s in h.snapshot_set], parts=[(0, path, None)])


def file_record(path: str) -> ImageRecord:
    """A stream file (`send -o FILE`): its header says what image it is."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            h = StreamReader(f, path).read_header()
            st = os.fstat(f.fileno())
    except OSError as e:
        raise FormatError(f"{path}: cannot read it as an image stream ({e.strerror})") from e
    return header_record(h, path, int(st.st_mtime), st.st_size)


def store_records(store: object) -> Iterator[ImageRecord]:
    """Every snapshot of every volume in an object store."""
    from .objstore.store import Store
    assert isinstance(store, Store)
    for volume in store.volumes():
        cat = store.need_catalog(volume)
        for s in cat.snaps():
            h = sfmt.Header.unpack(store.manifest(volume, s).stream_header)
            yield ImageRecord("store", f"{store.url}/{s.manifest}",
                              str(uuidlib.UUID(bytes=cat.uuid)), h.expression, s.name,
                              h.base.name if h.base else None, s.uploaded, s.blocks,
                              s.new_bytes, [x.name for x in h.snapshot_set],
                              store_volume=volume, parts=[(0, store.url, None)])
