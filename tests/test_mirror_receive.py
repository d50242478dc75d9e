"""The receive side a mirror relies on: an interrupted incremental never leaves
the destination offering a snapshot whose blocks it overwrote (the source had
dropped that snapshot and reused its blocks), and deallocations free blocks."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import StreamError
from blockxfer.stream.receive import receive_stream
from blockxfer.stream.send import send_image
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume
from tests.mirror_util import BS, make_volume, open_vol


def _stream(vol: Volume, expression: str) -> bytes:
    out = io.BytesIO()
    send_image(vol, expression, out)
    return out.getvalue()


def test_a_cut_stream_hides_the_dropped_snapshot_it_overwrote(tmp_path: Path) -> None:
    src, dst = str(tmp_path / "s.img"), str(tmp_path / "d.img")
    vol = make_volume(src, 8 << 20, 1 << 20)
    vol.write(0, os.urandom(vol.virtual_size))
    vol.create_snapshot("a")
    vol.write(0, os.urandom(vol.virtual_size // 2))       # a alone holds the old half
    vol.create_snapshot("b")
    receive_stream(io.BytesIO(_stream(vol, "a")), dst, open_device)
    receive_stream(io.BytesIO(_stream(vol, "b - a")), dst, open_device)
    a_blocks = vol.plane("a") & ~vol.plane("b")
    vol.destroy_snapshot("a")                             # its blocks are free at the source
    vol.commit()
    for _ in range(20):                                   # ... and taken again
        vol.write(0, os.urandom(vol.virtual_size // 2))
        vol.commit()
        if (vol.active.bits & a_blocks).any():
            break
    vol.create_snapshot("c")
    assert (vol.plane("c") & a_blocks).any(), "the test needs a reused block"
    raw = _stream(vol, "c - b")
    vol.close()
    with pytest.raises(StreamError):
        receive_stream(io.BytesIO(raw[:-200]), dst, open_device)    # cut before the trailer
    d = open_vol(dst, write=False)
    try:
        assert "a" not in d.snapshot_names()               # released: the source dropped it
        assert d.snapshot_names() == ["b"] and check_volume(d).clean
        assert d.read(0, d.virtual_size) == d.read(0, d.virtual_size, "b")
    finally:
        d.close()
    receive_stream(io.BytesIO(raw), dst, open_device)     # and the whole stream applies
    d = open_vol(dst, write=False)
    assert d.snapshot_names() == ["b", "c"] and check_volume(d).clean
    d.close()


def test_blocks_freed_by_a_receive_are_free_and_discarded(tmp_path: Path) -> None:
    src, dst = str(tmp_path / "s.img"), str(tmp_path / "d.img")
    vol = make_volume(src, 8 << 20, 1 << 20)
    vol.write(0, os.urandom(vol.virtual_size))
    vol.create_snapshot("a")
    receive_stream(io.BytesIO(_stream(vol, "a")), dst, open_device)
    vol.trim(0, vol.virtual_size)
    vol.create_snapshot("b")
    raw = _stream(vol, "b - a")
    vol.destroy_snapshot("a")
    vol.create_snapshot("c")
    raw2 = _stream(vol, "c - b")
    vol.close()
    receive_stream(io.BytesIO(raw), dst, open_device)
    used = os.stat(dst).st_blocks * 512
    receive_stream(io.BytesIO(raw2), dst, open_device)
    d = open_vol(dst, write=False)
    assert d.free_blocks() >= (1 << 20) // BS and check_volume(d).clean
    d.close()
    assert os.stat(dst).st_blocks * 512 <= used - (1 << 20) + 64 * BS
