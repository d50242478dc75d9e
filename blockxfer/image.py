"""Storage images: expressions over snapshot planes, evaluated with bulk bit operations.

Grammar (`&` binds tighter than `+` and `-`, which go left to right):

    expr   := term (("+" | "-") term)*
    term   := factor ("&" factor)*
    factor := NAME | GLOB | "(" expr ")"

A NAME is a snapshot or a pointer; a GLOB (`daily.*`) is the sum of the snapshots
it matches. `-` is an operator at the start of a token and part of a name inside
one (`a-b` is a name, `a - b` and `a -b` are differences). The subtrahend of `-`
must be one snapshot: the base an incremental image is applied onto.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Protocol

from bitarray import bitarray

from blockxfer.errors import ExpressionError, NotFound
from blockxfer.volume.layout import SnapshotEntry
from blockxfer.volume.objects import Stored, merge_stored

_TOKEN = re.compile(r"\s*(?:(?P<op>[+\-&()])|(?P<name>[A-Za-z0-9_.:*?\[\]][A-Za-z0-9_.:*?\[\]-]*))")
_GLOB = re.compile(r"[*?\[]")


class PlaneSource(Protocol):
    def snapshots(self) -> list[SnapshotEntry]: ...
    def resolve(self, name: str) -> SnapshotEntry: ...
    def plane(self, name: str) -> bitarray:
        """A plane the caller owns (it may change it)."""

    def stored_plane(self, name: str) -> Stored | None:
        """The plane's stored data blocks, or None: then `plane` is used."""


@dataclass
class Image:
    expression: str
    plane: bitarray
    block_size: int
    tops: list[SnapshotEntry] = field(default_factory=list)     # positive snapshots
    bases: list[SnapshotEntry] = field(default_factory=list)    # subtrahends

    @property
    def blocks(self) -> int:
        return self.plane.count()

    @property
    def top(self) -> SnapshotEntry | None:
        return max(self.tops, key=lambda e: e.generation, default=None)

    @property
    def base(self) -> SnapshotEntry | None:
        return max(self.bases, key=lambda e: e.generation, default=None)

    def as_dict(self) -> dict[str, object]:
        top, base = self.top, self.base
        return {"expression": self.expression, "blocks": self.blocks,
                "bytes": self.blocks * self.block_size,
                "top": top.name if top else None, "base": base.name if base else None}


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            bad = len(text[pos:]) - len(text[pos:].lstrip()) + pos
            raise ExpressionError(f"unexpected {text[bad]!r} at position {bad + 1} in {text!r}")
        kind = "op" if m.group("op") else "name"
        out.append((kind, m.group(kind), m.start(kind)))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, text: str, src: PlaneSource, block_size: int):
        self.text, self.src, self.block_size = text, src, block_size
        self.toks = _tokens(text)
        self.i = 0
        self.tops: list[SnapshotEntry] = []
        self.bases: list[SnapshotEntry] = []

    def _peek(self) -> tuple[str, str, int] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _fail(self, what: str) -> ExpressionError:
        tok = self._peek()
        where = f"position {tok[2] + 1}" if tok else "the end"
        return ExpressionError(f"expected {what} at {where} in {self.text!r}")

    def parse(self) -> bitarray:
        if not self.toks:
            raise ExpressionError("the image expression is empty; name at least one snapshot")
        plane = self.expr(positive=True)
        if self._peek() is not None:
            raise self._fail("an operator")
        return plane

    def expr(self, positive: bool) -> bitarray:
        plane = self.term(positive)         # factor() always returns a fresh plane
        while (tok := self._peek()) and tok[1] in "+-":
            self.i += 1
            if tok[1] == "-":
                self._merge(plane, self.subtrahend(), subtract=True)
            elif (names := self._bare_names()) is not None:
                for e in names:
                    self._merge(plane, e, subtract=False)
            else:
                plane |= self.term(positive)
        return plane

    def _bare_names(self) -> list[SnapshotEntry] | None:
        """The snapshots of a term that is one NAME or GLOB (no `&`, no parentheses),
        consumed; None (nothing consumed) for any other term."""
        tok, after = self._peek(), self.toks[self.i + 1] if self.i + 1 < len(self.toks) else None
        if tok is None or tok[0] != "name" or (after is not None and after[1] == "&"):
            return None
        self.i += 1
        entries = self._expand(tok)
        self.tops.extend(entries)
        return entries

    def _merge(self, plane: bitarray, e: SnapshotEntry, subtract: bool) -> None:
        """`plane |= e` or `plane &= ~e` in place; from the stored blocks alone when
        the source has them (a term of a sum need not become a whole plane)."""
        stored = self.src.stored_plane(e.name)
        if stored is not None:
            merge_stored(plane, stored, self.block_size, subtract)
            return
        other = self.src.plane(e.name)
        if subtract:
            other.invert()                  # in place: no second 32 MiB plane
            plane &= other
        else:
            plane |= other

    def subtrahend(self) -> SnapshotEntry:
        tok = self._peek()
        if tok is None or tok[0] != "name" or _GLOB.search(tok[1]):
            raise self._fail("one snapshot name after '-' (the base must be a snapshot)")
        self.i += 1
        entry = self._resolve(tok)
        self.bases.append(entry)
        return entry

    def term(self, positive: bool) -> bitarray:
        plane = self.factor(positive)
        while (tok := self._peek()) and tok[1] == "&":
            self.i += 1
            plane = plane & self.factor(positive)
        return plane

    def factor(self, positive: bool) -> bitarray:
        tok = self._peek()
        if tok is None:
            raise self._fail("a snapshot name or '('")
        if tok[1] == "(":
            self.i += 1
            plane = self.expr(positive)
            if (close := self._peek()) is None or close[1] != ")":
                raise self._fail("')'")
            self.i += 1
            return plane
        if tok[0] != "name":
            raise self._fail("a snapshot name or '('")
        self.i += 1
        entries = self._expand(tok)
        self.tops.extend(entries)
        plane = self.src.plane(entries[0].name)      # ours: planes are handed out owned
        for e in entries[1:]:
            self._merge(plane, e, subtract=False)
        return plane

    def _resolve(self, tok: tuple[str, str, int]) -> SnapshotEntry:
        try:
            return self.src.resolve(tok[1])
        except NotFound as e:
            raise NotFound(f"{e} (position {tok[2] + 1} in {self.text!r})") from None

    def _expand(self, tok: tuple[str, str, int]) -> list[SnapshotEntry]:
        if not _GLOB.search(tok[1]):
            return [self._resolve(tok)]
        found = [e for e in self.src.snapshots() if fnmatch.fnmatchcase(e.name, tok[1])]
        if not found:
            raise NotFound(f"pattern {tok[1]!r} matches no snapshot "
                           f"(position {tok[2] + 1} in {self.text!r})")
        return found


def evaluate(text: str, src: PlaneSource, block_size: int) -> Image:
    """Evaluate an image expression over the planes of `src` (usually a Volume)."""
    p = _Parser(text, src, block_size)
    plane = p.parse()
    return Image(text, plane, block_size, p.tops, p.bases)


def missing_blocks(img: Image, src: PlaneSource) -> bitarray:
    """Blocks the top snapshot's plane needs that neither the image nor its base holds.

    A receiver rebuilds the top from the image's blocks plus the base it already has
    (complete), so an image is restorable exactly when this plane is empty."""
    top, base = img.top, img.base
    if top is None:
        return bitarray()
    need = src.plane(top.name)
    need &= ~img.plane
    if base is not None:
        need &= ~src.plane(base.name)
    return need


def require_restorable(img: Image, src: PlaneSource) -> None:
    """Refuse an image that could never be restored (e.g. `june1 & june3`), saying why."""
    top, base = img.top, img.base
    if top is None:
        return
    lacking = missing_blocks(img, src).count()
    if lacking:
        fix = f"{top.name} - {base.name}" if base is not None else top.name
        raise ExpressionError(
            f"image {img.expression!r} cannot be restored: it lacks {lacking} blocks of its "
            f"top snapshot {top.name!r}" + (f" that base {base.name!r} does not hold"
                                            if base is not None else "")
            + f"; every image must hold its top's blocks (for example {fix!r})")
