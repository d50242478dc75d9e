"""The local area written through two LocalState copies of one process (a receive
into an open volume saving its progress while the volume sets a property): the
writes alternate slots with rising sequence numbers, and the newest is read back."""

from __future__ import annotations

import threading
from pathlib import Path

from blockxfer.drivers.blockdev import open_device
from blockxfer.volume.local import LocalArea, LocalState


def test_two_copies_alternate_slots_and_the_newest_wins(tmp_path: Path) -> None:
    dev = open_device(str(tmp_path / "d.img"), write=True, create_size=8 << 20)
    area = LocalArea(dev, 4096, 2048)
    mine, theirs = LocalState(root_generation=5), LocalState(root_generation=5)
    for i in range(6):
        st = mine if i % 2 else theirs
        st.props = {"who": b"mine" if st is mine else b"theirs", "i": str(i).encode()}
        area.write(st)
        back = LocalArea(dev, 4096, 2048).read(5)
        assert back.props["i"] == str(i).encode(), i       # never an older write
    assert mine.seq != theirs.seq


def test_concurrent_writers_leave_one_of_their_states(tmp_path: Path) -> None:
    dev = open_device(str(tmp_path / "d.img"), write=True, create_size=8 << 20)
    area = LocalArea(dev, 4096, 2048)
    last: list[bytes] = []
    lock = threading.Lock()

    def writer(tag: bytes) -> None:
        st = LocalState(root_generation=1)
        for i in range(20):
            st.props = {"w": tag + str(i).encode()}
            with lock:                   # what the area's own lock orders: record it
                area.write(st)
                last.append(st.props["w"])
    ts = [threading.Thread(target=writer, args=(t,)) for t in (b"a", b"b")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert LocalArea(dev, 4096, 2048).read(1).props["w"] == last[-1]
