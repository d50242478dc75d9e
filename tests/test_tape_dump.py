"""Tape backup and restore on the virtual tape (the same tests run on /dev/nst0 in
the test bed when BLOCKXFER_TEST_TAPE is set): levels 0/1/2, spanning two tapes,
every fault the operator can meet, and a target that stays as it was."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.tapes import StTape, open_tape_handle
from blockxfer.drivers.vtape import create_virtual_tape
from blockxfer.errors import BlockxferError, EndOfMedium, StreamError, UsageError, WriteProtected
from blockxfer.transfer.dump import DumpResult, dump_image
from blockxfer.transfer.restore import RestoreStep, restore_images, verify_image
from blockxfer.transfer.tapeset import label_tape, list_tape
from blockxfer.volume import Volume
from tests.test_stream import make_source, snapshot_contents

MiB = 1 << 20
LEVELS = ["june3 + june2 + june1", "june5 + june4 - june3", "june7 + june6 - june5"]


def opener(path: str, write: bool) -> StTape:
    return open_tape_handle(path, write=write)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, bytes]]:
    path = str(tmp_path_factory.mktemp("tsrc") / "src.img")
    vol = make_source(path)
    contents = {e.name: vol.read(0, vol.virtual_size, snapshot=e.name) for e in vol.snapshots()}
    vol.close()
    return path, contents


def dump(src: str, expr: str, tape: str, **kw: Any) -> DumpResult:
    with Volume.open(open_device(src), writable=False) as vol:
        return dump_image(vol, expr, tape, open_tape=opener, **kw)


def restore(tape: str, target: str, **kw: Any) -> list[RestoreStep]:
    return restore_images(tape, target, open_tape=opener, open_device=open_device,
                          **kw)


def test_levels_on_one_tape(src: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    path, contents = src
    tape = str(tmp_path / "t.vtape")
    create_virtual_tape(tape, 256 * MiB, locate=False)
    for expr in LEVELS:
        dump(path, expr, tape)
    listing = list_tape(opener(tape, False))
    assert [i.descriptor.expression for i in listing.images] == LEVELS
    assert all(i.complete for i in listing.images)
    verify_image(tape, 2, open_tape=opener)
    target = str(tmp_path / "r.img")
    restore(tape, target, snapshot="june7")
    got = snapshot_contents(target)
    assert set(got) == {f"june{d}" for d in range(1, 8)}
    assert all(got[n] == contents[n] for n in got)


def _set(tmp_path: Path, n: int) -> list[str]:
    tapes = [str(tmp_path / f"s{i}.vtape") for i in range(1, n + 1)]
    for t in tapes:
        create_virtual_tape(t, 5 * MiB, early_warning=1 * MiB)
    return tapes


def test_spanning_two_tapes_and_restore(src: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    path, contents = src
    tapes = _set(tmp_path, 3)
    res = dump(path, LEVELS[0], tapes[0], label="weekly",
               next_tape=lambda name, seq: tapes[seq - 1])
    assert len(res.tapes) >= 2
    second = list_tape(opener(tapes[1], False))
    assert second.label.set_name == "weekly" and second.label.seq == 2
    target = str(tmp_path / "r.img")
    restore(tapes[0], target, next_tape=lambda name, seq: tapes[seq - 1])
    assert snapshot_contents(target)["june3"] == contents["june3"]
    r2 = str(tmp_path / "r2.img")
    with pytest.raises(StreamError, match="tape 2 of set 'weekly' is needed") as e:
        restore(tapes[0], r2, next_tape=lambda n, s: tapes[0])
    assert not os.path.exists(r2) and "was removed" in str(e.value)
    assert "send" not in str(e.value) and "run the same restore again" in str(e.value)


def test_spanned_image_without_next_tape_is_refused_first(src: tuple[str, dict[str, bytes]],
                                                          tmp_path: Path) -> None:
    """Plan first: nothing is written when the image continues on a tape restore has
    no way to ask for; the suggestion is a restore command, not a send."""
    path, contents = src
    tapes = _set(tmp_path, 3)
    dump(path, LEVELS[0], tapes[0], label="weekly", next_tape=lambda name, seq: tapes[seq - 1])
    target = str(tmp_path / "r.img")
    with pytest.raises(UsageError, match="continues on tape 2 of set 'weekly'; give "
                                         "--next-tape") as e:
        restore(tapes[0], target)
    assert "nothing was written" in str(e.value)
    assert not os.path.exists(target)
    existing = str(tmp_path / "existing.img")
    restore(tapes[0], existing, next_tape=lambda name, seq: tapes[seq - 1])
    before = Path(existing).read_bytes()
    with pytest.raises(UsageError, match="continues on tape 2"):
        restore(tapes[0], existing, force=True)
    assert Path(existing).read_bytes() == before
    assert snapshot_contents(existing)["june3"] == contents["june3"]


def test_full_tape_without_next_is_incomplete(src: tuple[str, dict[str, bytes]],
                                              tmp_path: Path) -> None:
    path, _ = src
    tape = _set(tmp_path, 1)[0]
    with pytest.raises(EndOfMedium, match="no next tape"):
        dump(path, LEVELS[0], tape)
    listing = list_tape(opener(tape, False))
    assert not listing.images[0].complete
    with pytest.raises(UsageError, match="incomplete"):
        restore(tape, str(tmp_path / "r.img"), image=1)


def test_write_protected_tape(src: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    path, _ = src
    tape = str(tmp_path / "wp.vtape")
    create_virtual_tape(tape, 64 * MiB, write_protect=True)
    with pytest.raises(BlockxferError, match="write-protected") as e:
        dump(path, LEVELS[0], tape)
    assert isinstance(e.value, WriteProtected) or "write-protected" in str(e.value)


def test_tape_that_is_not_ours_or_from_another_set(src: tuple[str, dict[str, bytes]],
                                                   tmp_path: Path) -> None:
    path, _ = src
    foreign = str(tmp_path / "f.vtape")
    create_virtual_tape(foreign, 64 * MiB)
    t = opener(foreign, True)
    t.write_record(b"tar archive".ljust(10240, b"\0"))
    t.write_filemarks(1)
    t.close()
    with pytest.raises(BlockxferError, match="not a blockxfer tape"):
        dump(path, LEVELS[0], foreign)
    tapes = _set(tmp_path, 2)
    other = str(tmp_path / "other.vtape")
    create_virtual_tape(other, 64 * MiB)
    t = opener(other, True)
    label_tape(t, "monthly")
    t.close()
    with pytest.raises(BlockxferError, match="belongs to set 'monthly'"):
        dump(path, LEVELS[0], tapes[0], label="weekly", next_tape=lambda n, s: other)


def test_damaged_record_mid_restore_leaves_target(src: tuple[str, dict[str, bytes]],
                                                  tmp_path: Path) -> None:
    path, contents = src
    tape = str(tmp_path / "t.vtape")
    create_virtual_tape(tape, 256 * MiB)
    dump(path, LEVELS[0], tape)
    dump(path, LEVELS[1], tape)
    target = str(tmp_path / "r.img")
    restore(tape, target, image=1)
    size = os.path.getsize(tape)
    with open(tape, "r+b") as f:               # flip a byte inside image 2's data
        f.seek(size - 2 * MiB)
        b = f.read(1)
        f.seek(size - 2 * MiB)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(BlockxferError, match=r"t\.vtape.*file 3, record|checksum"):
        restore(tape, target, image=2)
    got = snapshot_contents(target)
    assert set(got) == {"june1", "june2", "june3"} and got["june3"] == contents["june3"]


@pytest.mark.parametrize("locate", [True, False])
def test_partial_restore_reads_only_what_it_needs(src: tuple[str, dict[str, bytes]], tmp_path: Path,
                                                  locate: bool) -> None:
    from blockxfer.transfer.restore import restore_range
    path, contents = src
    tape = str(tmp_path / "t.vtape")
    create_virtual_tape(tape, 256 * MiB, locate=locate)
    dump(path, LEVELS[0], tape)
    full = str(tmp_path / "full.img")
    restore(tape, full, image=1)
    part = str(tmp_path / "part.img")
    with open(part, "wb") as f:
        f.truncate(os.path.getsize(full))
    listing = list_tape(opener(tape, False))
    idx = listing.images[0].index
    assert idx is not None and (idx.position >= 0) == locate
    vbn, count, _ = idx.records[len(idx.records) // 2]
    res = restore_range(tape, part, 1, vbn + 1, vbn + 1, open_tape=opener,
                        open_device=open_device, force=True)      # a plain file: --force
    assert res.blocks == 1 and res.records_read <= 6
    with open(full, "rb") as a, open(part, "rb") as b:
        a.seek((vbn + 1) * 4096)
        b.seek((vbn + 1) * 4096)
        assert a.read(4096) == b.read(4096)


def test_lone_filemark_counts_as_blank(src: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    path, _ = src
    tape = str(tmp_path / "fm.vtape")
    create_virtual_tape(tape, 64 * MiB)
    t = opener(tape, True)
    t.write_filemarks(1)
    t.close()
    dump(path, LEVELS[0], tape, label="FM")
    assert list_tape(opener(tape, False)).label.serial == "FM"


def test_spanning_a_large_image_all_snapshots(src: tuple[str, dict[str, bytes]],
                                              tmp_path: Path) -> None:
    """The same shape as the st spanning test: every snapshot in one image."""
    path, contents = src
    tapes = _set(tmp_path, 6)
    res = dump(path, "june*", tapes[0], next_tape=lambda name, seq: tapes[seq - 1])
    assert len(res.tapes) >= 2
    target = str(tmp_path / "r.img")
    restore(tapes[0], target, next_tape=lambda name, seq: tapes[seq - 1])
    got = snapshot_contents(target)
    assert got == {n: contents[n] for n in got} and len(got) == 9


def test_restore_one_snapshot_from_a_level_0_image(src: tuple[str, dict[str, bytes]],
                                                   tmp_path: Path) -> None:
    from blockxfer.transfer.snaprestore import restore_snapshot_only
    path, contents = src
    tape = str(tmp_path / "t.vtape")
    create_virtual_tape(tape, 256 * MiB, locate=False)
    dump(path, LEVELS[0], tape)
    target = str(tmp_path / "june1.img")
    res, records = restore_snapshot_only(tape, target, 1, "june1", open_tape=opener,
                                         open_device=open_device)
    got = snapshot_contents(target)
    assert got["june1"] == contents["june1"] and res.top == "june1"
    index = list_tape(opener(tape, False)).images[0].index
    assert index is not None
    total = index.total
    assert records * 256 * 1024 < total            # it did not read the whole image


def test_records_filled_in_place_are_the_packed_format() -> None:
    """The dump copies the stream straight into reused record buffers (issue 15: one
    copy per byte); every record, the short last one included, must still be exactly
    what pack_record makes: header, payload, zero padding (a reused buffer is dirty)."""
    from blockxfer.transfer import tapefmt as tf
    from blockxfer.transfer.dump import _Packer, _Writer

    class Sink:
        def __init__(self) -> None:
            self.path, self.records = "sink", []   # type: ignore[var-annotated]  # duck-typed tape double

        def write_record(self, rec: bytearray) -> None:
            self.records.append(bytes(rec))

    rs = 4096
    label = tf.Label("S", "S", bytes(16), 1, rs, 0)
    desc = tf.Descriptor("ab" * 16, "x", "x", None, [], "u", 0, 0)
    w = _Writer(Sink(), label, desc, None, None, [])  # type: ignore[arg-type]  # a Sink, not a Tape
    for _ in range(8):
        w.free.put(bytearray(b"\xff" * rs))                   # reused buffers are dirty
    w.thread.start()
    packer = _Packer(w)
    data = os.urandom(5 * rs + 1234)
    at = 0
    for n in (7, rs, 3 * rs - 40, 100, len(data)):             # pieces across record edges
        assert packer.write(memoryview(data[at:at + n])) == len(data[at:at + n])
        at += n
    packer.close()
    w.q.put(None)
    w.thread.join()
    assert w.error is None
    full = b"".join(tf.unpack_record(r, "sink")[4] for r in w.tape.records)  # type: ignore[attr-defined]  # w.tape is the Sink
    assert full == data and packer.total == len(data)
    per = rs - tf.REC.size
    assert len(w.tape.records) == -(-len(full) // per)         # type: ignore[attr-defined]  # w.tape is the Sink
    for i, rec in enumerate(w.tape.records):                   # type: ignore[attr-defined]  # w.tape is the Sink
        assert rec == tf.pack_record(tf.DATA, w.key, 0, i, full[i * per:(i + 1) * per], rs)
