"""Image expressions over a real volume, whose planes are merged from their stored
blocks (`merge_stored`) where a term is a bare name, agree with whole planes and
with a set-of-VBNs model, for expressions with and without parentheses."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
from bitarray import bitarray
from hypothesis import given, settings
from hypothesis import strategies as st

from blockxfer.drivers.blockdev import open_device
from blockxfer.image import evaluate
from blockxfer.volume import Volume
from blockxfer.volume.layout import SnapshotEntry

BS = 4096
NAMES = ["s0", "s1", "s2", "s3"]


class WholePlanes:
    """The same volume seen only through whole planes (the fallback path)."""

    def __init__(self, vol: Volume):
        self.vol = vol

    def snapshots(self) -> list[SnapshotEntry]:
        return self.vol.snapshots()

    def resolve(self, name: str) -> SnapshotEntry:
        return self.vol.resolve(name)

    def plane(self, name: str) -> bitarray:
        return self.vol.plane(name)

    def stored_plane(self, name: str) -> None:
        return None


@pytest.fixture(scope="module")
def vol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Volume]:
    """Four snapshots whose planes span several plane data blocks (32768 VBNs each),
    with holes between: writes far apart in a 1 GiB sparse volume."""
    path = str(tmp_path_factory.mktemp("img") / "vol.img")
    v = Volume.create(open_device(path, write=True, create_size=1 << 30))
    rng = random.Random(7)
    for name in NAMES:
        for _ in range(40):
            at = rng.randrange(v.virtual_size // BS - 8) * BS
            v.write(at, os.urandom(BS * rng.randrange(1, 9)))
        v.create_snapshot(name)
    yield v
    v.close()


def _set(plane: bitarray) -> set[int]:
    return set(plane.search(1))


GLOBS = {"s[01]": ["s0", "s1"], "s[23]": ["s2", "s3"], "s*": NAMES}
Factor = str | list            # a name or glob, or a parenthesised sum
Sum = list                     # [(op, [factor, ...]), ...]: terms of `&`-ed factors


@st.composite
def sums(draw: st.DrawFn, depth: int = 0) -> Sum:
    """Sums and differences of bare names (the stored path), globs, `&` and
    parenthesised terms (the whole-plane path), mixed."""
    def factor() -> Factor:
        if depth < 2 and draw(st.integers(0, 3)) == 0:
            return draw(sums(depth + 1))
        return draw(st.sampled_from([*NAMES, *GLOBS]))
    out: Sum = []
    for k in range(draw(st.integers(1, 4))):
        op = "+" if k == 0 else draw(st.sampled_from("+-"))
        term = [draw(st.sampled_from(NAMES))] if op == "-" else \
            [factor() for _ in range(draw(st.integers(1, 2)))]
        out.append((op, term))
    return out


def _text(s: Sum) -> str:
    def factor(f: Factor) -> str:
        return f if isinstance(f, str) else f"({_text(f)})"
    parts = [" & ".join(factor(f) for f in term) for _, term in s]
    return parts[0] + "".join(f" {op} {p}" for (op, _), p in zip(s[1:], parts[1:], strict=True))


def _value(s: Sum, env: dict[str, set[int]]) -> set[int]:
    def factor(f: Factor) -> set[int]:
        if isinstance(f, list):
            return _value(f, env)
        return set().union(*(env[n] for n in GLOBS.get(f, [f])))
    out: set[int] = set()
    for op, term in s:
        v = factor(term[0])
        for f in term[1:]:
            v &= factor(f)
        out = out | v if op == "+" else out - v
    return out


@settings(max_examples=150, deadline=None)
@given(expr=sums())
def test_stored_and_whole_planes_agree(vol: Volume, expr: Sum) -> None:
    text = _text(expr)
    ours, whole = evaluate(text, vol, BS), evaluate(text, WholePlanes(vol), BS)
    assert ours.plane == whole.plane, text
    assert [e.name for e in ours.tops] == [e.name for e in whole.tops], text
    env = {n: _set(vol.plane(n)) for n in NAMES}
    assert _set(ours.plane) == _value(expr, env), text
