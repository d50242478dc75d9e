"""The volume against a dict model under random writes, trims, snapshots, destroys
and reopens (hypothesis stateful testing)."""

from __future__ import annotations

import os
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockxfer.drivers.blockdev import open_device
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume

VSIZE = 256 * 1024


class VolumeModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "v.img")
        self.vol = Volume.create(open_device(self.path, write=True, create_size=4 << 20),
                                 virtual_size=VSIZE)
        self.disk = bytearray(VSIZE)
        self.snaps: dict[str, bytes] = {}
        self.n = 0

    @rule(off=st.integers(0, VSIZE - 1), data=st.binary(min_size=1, max_size=20000))
    def write(self, off: int, data: bytes) -> None:
        data = data[:VSIZE - off]
        self.vol.write(off, data)
        self.disk[off:off + len(data)] = data

    @rule(off=st.integers(0, VSIZE - 1), n=st.integers(1, 30000))
    def trim(self, off: int, n: int) -> None:
        n = min(n, VSIZE - off)
        self.vol.trim(off, n)
        self.disk[off:off + n] = bytes(n)

    @rule()
    def snapshot(self) -> None:
        self.n += 1
        name = f"s{self.n}"
        self.vol.create_snapshot(name)
        self.snaps[name] = bytes(self.disk)

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def destroy(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.snaps)))
        self.vol.destroy_snapshot(name)
        del self.snaps[name]

    @rule()
    def reopen(self) -> None:
        self.vol.close()
        self.vol = Volume.open(open_device(self.path, write=True))

    @invariant()
    def reads_match(self) -> None:
        assert self.vol.read(0, VSIZE) == bytes(self.disk)
        for name, content in self.snaps.items():
            assert self.vol.read(0, VSIZE, snapshot=name) == content

    @invariant()
    def dirty_count_kept(self) -> None:
        tree = self.vol.lba
        assert tree.dirty_nodes == sum(1 for n in tree.nodes.values() if n.dirty)

    def teardown(self) -> None:
        self.vol.commit()
        assert check_volume(self.vol).clean
        self.vol.close()
        self.dir.cleanup()


TestVolumeModel = VolumeModel.TestCase
TestVolumeModel.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
