"""What an image must cover to be restorable: its blocks plus its base's hold every
block of its top's plane. send and dump refuse anything less, saying why; a partial
stream made before that rule is refused by receive as partial, never as damage."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.tapes import open_tape_handle
from blockxfer.drivers.vtape import create_virtual_tape
from blockxfer.errors import BlockxferError, ExpressionError, StreamError
from blockxfer.stream import send as send_mod
from blockxfer.stream.receive import receive_stream
from blockxfer.stream.send import send_image
from blockxfer.transfer.dump import dump_image
from blockxfer.transfer.tapeset import list_tape
from blockxfer.volume import Volume
from tests.test_stream import make_source, snapshot_contents

MiB = 1 << 20
NAMES = [f"june{d}" for d in range(1, 10)]


class Source(tuple):
    """(path, contents): a short repr, as hypothesis prints its arguments."""

    def __repr__(self) -> str:
        return f"Source({self[0]!r})"


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Source:
    path = str(tmp_path_factory.mktemp("rsrc") / "src.img")
    vol = make_source(path)
    contents = {e.name: vol.read(0, vol.virtual_size, snapshot=e.name) for e in vol.snapshots()}
    vol.close()
    return Source((path, contents))


def _stream(path: str, expr: str) -> bytes:
    buf = io.BytesIO()
    with Volume.open(open_device(path), writable=False) as vol:
        send_image(vol, expr, buf)
    return buf.getvalue()


def test_send_refuses_an_image_missing_its_tops_blocks(src: Source) -> None:
    path, _ = src
    with pytest.raises(ExpressionError, match=r"'june1 & june3' cannot be restored: it lacks "
                                              r"\d+ blocks of its top snapshot 'june3'"):
        _stream(path, "june1 & june3")
    with pytest.raises(ExpressionError, match="that base 'june1' does not hold"):
        _stream(path, "june3 & june5 - june1")


def test_dump_refuses_it_before_touching_the_tape(src: Source, tmp_path: Path) -> None:
    path, _ = src
    tape = str(tmp_path / "t.vtape")
    create_virtual_tape(tape, 64 * MiB)
    with Volume.open(open_device(path), writable=False) as vol, \
            pytest.raises(ExpressionError, match="cannot be restored"):
        dump_image(vol, "june1 & june3", tape, open_tape=lambda p, w: open_tape_handle(p, write=w))
    t = open_tape_handle(tape, write=False)
    try:
        from blockxfer.transfer.tapeset import read_label
        assert read_label(t) is None or not list_tape(t).images
    finally:
        t.close()


def test_old_partial_stream_is_refused_as_partial(src: Source, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = src
    monkeypatch.setattr(send_mod, "require_restorable", lambda img, src: None)
    partial = _stream(path, "june1 & june3")        # as a blockxfer without the rule made it
    target = str(tmp_path / "t.img")
    with pytest.raises(StreamError) as e:
        receive_stream(io.BytesIO(partial), target, open_device)
    assert "partial, not restorable" in str(e.value) and "damage" not in \
        str(e.value).replace("not damaged", "")
    assert not os.path.exists(target)                # a new target is removed again


_leaf = st.sampled_from(NAMES)
_positive = st.recursive(_leaf, lambda inner: st.tuples(inner, st.sampled_from(["+", "&"]), inner)
                         .map(lambda t: f"({t[0]} {t[1]} {t[2]})"), max_leaves=4)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(_positive, st.one_of(st.none(), _leaf))
def test_every_expression_send_accepts_restores(src: Source, positive: str,
                                                base: str | None) -> None:
    path, contents = src
    expr = positive if base is None else f"{positive} - {base}"
    try:
        stream = _stream(path, expr)
    except BlockxferError:
        return                                      # refused, with its reason
    with tempfile.TemporaryDirectory() as d:
        target = os.path.join(d, "t.img")
        if base is not None:
            receive_stream(io.BytesIO(_stream(path, base)), target, open_device)
        res = receive_stream(io.BytesIO(stream), target, open_device)
        got = snapshot_contents(target)
    assert got[res.top] == contents[res.top], expr
    assert [n for n, data in got.items() if data != contents[n]] == [], expr
