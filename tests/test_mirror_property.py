"""The image a mirror sends from its mark-on-allocate buffers is the plane
difference of the two CPs it spans, and its deallocations are the blocks of the
base that the top no longer uses, over random write/trim/snapshot/destroy/CP
sequences (issue 12, "Must hold")."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockxfer.transfer.mirror.plan import plan_changes, plan_planes
from blockxfer.volume import Volume
from tests.mirror_util import BS, make_volume

NB = (4 << 20) // BS

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, NB - 1), st.integers(1, 16)),
    st.tuples(st.just("trim"), st.integers(0, NB - 1), st.integers(1, 16)),
    st.tuples(st.just("snap"), st.integers(0, 3), st.just(0)),
    st.tuples(st.just("destroy"), st.integers(0, 3), st.just(0)),
    st.tuples(st.just("commit"), st.just(0), st.just(0)),
    st.tuples(st.just("cut"), st.just(0), st.just(0)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=40))
def test_buffers_equal_plane_difference(ops: list[tuple[str, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        vol = make_volume(os.path.join(d, "v.img"))
        try:
            _run(vol, ops + [("cut", 0, 0)])
        finally:
            vol.close()


def _run(vol: Volume, ops: list[tuple[str, int, int]]) -> None:
    cuts, base = 0, None
    assert vol.snapshot_changes("m0") is None      # tracking starts at the first cut
    base = "m0"
    for kind, a, b in ops:
        n = min(b, NB - a)
        if kind == "write":
            vol.write(a * BS, os.urandom(n * BS))
        elif kind == "trim":
            vol.trim(a * BS, n * BS)
        elif kind == "snap" and f"u{a}" not in vol.snapshot_names():
            vol.create_snapshot(f"u{a}")
        elif kind == "destroy" and f"u{a}" in vol.snapshot_names():
            vol.destroy_snapshot(f"u{a}")
        elif kind == "commit":
            vol.commit()
        elif kind == "cut":
            cuts += 1
            top = f"m{cuts}"
            ch = vol.snapshot_changes(top)
            assert ch is not None and ch.base == base and ch.top == top
            b_plane, t_plane = vol.plane(base), vol.plane(top)
            assert ch.image == t_plane & ~b_plane
            assert ch.freed == b_plane & ~t_plane
            moa = plan_changes(vol, ch, bytes(16))
            diff = plan_planes(vol, top, base, bytes(16))
            assert moa.runs == diff.runs and moa.dealloc == diff.dealloc
            assert (moa.header.image_digest, moa.header.image_blocks,
                    moa.header.dealloc_blocks) == (diff.header.image_digest,
                                                   diff.header.image_blocks,
                                                   diff.header.dealloc_blocks)
            assert moa.check is not None and diff.check is not None
            want = np.isin(diff.check.vbns, moa.check.vbns)
            changed = np.array([ch.image[int(v)] for v in diff.check.vbns], dtype=bool)
            assert (want == changed).all()         # every changed data block, no other
            assert (moa.check.vbns == diff.check.vbns[changed]).all()
            assert (moa.check.checksums == diff.check.checksums[changed]).all()
            vol.destroy_snapshot(base)             # the mirror drops its old base
            base = top
