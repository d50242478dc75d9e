"""Image expressions: parsing, errors with positions, and the plane algebra checked
against a set-of-ints model with hypothesis."""

from __future__ import annotations

import pytest
from bitarray import bitarray
from hypothesis import given, settings
from hypothesis import strategies as st

from blockxfer.errors import ExpressionError, NotFound
from blockxfer.image import evaluate
from blockxfer.volume.layout import ObjectRef, SnapshotEntry

NBITS = 64


class FakeVolume:
    """Planes from sets of VBNs; pointers map to snapshot names."""

    def __init__(self, sets: dict[str, set[int]], pointers: dict[str, str] | None = None):
        self.sets, self.pointers = sets, pointers or {}
        self.entries = [SnapshotEntry(i, n, bytes(16), 0, i, 0, len(s), ObjectRef(), None)
                        for i, (n, s) in enumerate(sets.items())]

    def snapshots(self) -> list[SnapshotEntry]:
        return self.entries

    def resolve(self, name: str) -> SnapshotEntry:
        name = self.pointers.get(name, name)
        for e in self.entries:
            if e.name == name:
                return e
        raise NotFound(f"no snapshot or pointer named {name!r}")

    def plane(self, name: str) -> bitarray:
        a = bitarray(NBITS, endian="little")
        a.setall(0)
        for v in self.sets[self.resolve(name).name]:
            a[v] = 1
        return a

    def stored_plane(self, name: str) -> None:
        return None


def _set(plane: bitarray) -> set[int]:
    return {i for i, b in enumerate(plane) if b}


JUNE = FakeVolume({f"june{i}": set(range(i, 40, i)) for i in range(1, 10)},
                  {"master": "june5"})


def test_patent_level_examples() -> None:
    img = evaluate("june5 + june4 - june3", JUNE, 4096)
    assert _set(img.plane) == (JUNE.sets["june5"] | JUNE.sets["june4"]) - JUNE.sets["june3"]
    assert img.top is not None and img.top.name == "june5"
    assert img.base is not None and img.base.name == "june3"
    full = evaluate("june3 + june2 + june1", JUNE, 4096)
    assert full.base is None and full.as_dict()["bytes"] == full.blocks * 4096


def test_pointer_glob_intersection_and_parentheses() -> None:
    assert _set(evaluate("master", JUNE, 4096).plane) == JUNE.sets["june5"]
    glob = evaluate("june[12]*", JUNE, 4096)
    assert _set(glob.plane) == JUNE.sets["june1"] | JUNE.sets["june2"]
    both = evaluate("(june2 + june3) & june4", JUNE, 4096)
    assert _set(both.plane) == (JUNE.sets["june2"] | JUNE.sets["june3"]) & JUNE.sets["june4"]


@pytest.mark.parametrize("text, where", [
    ("june5 +", "the end"), ("june5 + - june3", "position 9"), ("(june5", "the end"),
    ("june5 june4", "position 7"), ("june5 - (june3)", "position 9"),
    ("june5 - june*", "position 9"), ("", "empty"), ("june5 $ june3", "position 7"),
])
def test_syntax_errors_name_the_position(text: str, where: str) -> None:
    with pytest.raises(ExpressionError, match=where.replace("(", r"\(")):
        evaluate(text, JUNE, 4096)


def test_unknown_names() -> None:
    with pytest.raises(NotFound, match="nosuch"):
        evaluate("june5 - nosuch", JUNE, 4096)
    with pytest.raises(NotFound, match="matches no snapshot"):
        evaluate("weekly.*", JUNE, 4096)


names = st.sampled_from(sorted(JUNE.sets))


@st.composite
def expressions(draw: st.DrawFn, depth: int = 0) -> tuple[str, set[int]]:
    """A random expression with its value computed on Python sets."""
    if depth > 2 or draw(st.booleans()):
        n = draw(names)
        return n, set(JUNE.sets[n])
    left, lv = draw(expressions(depth + 1))
    op = draw(st.sampled_from("+-&"))
    if op == "-":
        n = draw(names)
        return f"({left}) - {n}", lv - JUNE.sets[n]
    right, rv = draw(expressions(depth + 1))
    return f"({left}) {op} ({right})", (lv | rv) if op == "+" else (lv & rv)


@settings(max_examples=300, deadline=None)
@given(expressions())
def test_algebra_matches_sets(case: tuple[str, set[int]]) -> None:
    text, expected = case
    assert _set(evaluate(text, JUNE, 4096).plane) == expected
