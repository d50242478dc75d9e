"""Spanning tapes whatever the early-warning zone: a part ends in what the zone is
sure to hold (the refused record goes to the next tape, the index is one record,
location rows that do not fit are carried on), and `tape create` refuses a
geometry that cannot work, saying the minimum. All through the command line."""

from __future__ import annotations

import json
import os
import stat

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.tapes import open_tape
from blockxfer.transfer import tapefmt as tf
from blockxfer.transfer.tapeset import list_tape
from blockxfer.volume import Volume
from tests.clihelp import BX, bx, one_line
from tests.marks import first_fast

K, M = 1 << 10, 1 << 20
# the least early-warning zones (2 records + 64K, docs/tape-format.md) are written out


def _next_tape_script(folder: str, *create: str) -> str:
    """A --next-tape command: tape N is FOLDER/tN.vtape, created blank when missing."""
    path = os.path.join(folder, "next.sh")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nt={folder}/t$BLOCKXFER_TAPE_SEQ.vtape\n"
                f"[ -e $t ] || {' '.join(BX)} tape create $t {' '.join(create)} >&2 || exit 1\n"
                "echo $t\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return path


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> str:
    """40 MiB in snapshot 'full'."""
    vol = f"{tmp_path_factory.mktemp('span')}/v.img"
    assert bx("init", vol, "--size", "128M").returncode == 0
    assert bx("write", vol, data=os.urandom(40 * M)).returncode == 0
    assert bx("snapshot", f"{vol}@full").returncode == 0
    return vol


@pytest.fixture(scope="module")
def scattered(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Snapshot 'holes': 16 MiB whose every other block sits alone between freed
    VBNs, so the image has one location row per block."""
    vol = f"{tmp_path_factory.mktemp('holes')}/v.img"
    assert bx("init", vol, "--size", "64M").returncode == 0
    assert bx("write", vol, data=os.urandom(16 * M)).returncode == 0
    with Volume.open(open_device(vol, write=True)) as v:
        for k in range(0, 16 * M, 8 * K):
            v.write(k, os.urandom(4 * K))
    assert bx("snapshot", f"{vol}@holes").returncode == 0
    return vol


def _dump_and_restore(vol: str, expression: str, top: str, folder: str, *geometry: str,
                      record_size: str = "256K", verify: bool = False) -> list[dict]:
    nxt = _next_tape_script(folder, *geometry)
    t1 = os.path.join(folder, "t1.vtape")
    assert bx("tape", "create", t1, *geometry).returncode == 0
    r = bx("dump", vol, expression, "--tape", t1, "--record-size", record_size,
           "--next-tape", nxt, *(["--verify"] if verify else []))
    assert r.returncode == 0, r.stderr
    tapes = sorted((n for n in os.listdir(folder) if n.endswith(".vtape")),
                   key=lambda n: int(n[1:-6]))
    assert len(tapes) > 1, "the image should have spanned"
    listings = [json.loads(bx("tape", "list", os.path.join(folder, t), "--json").stdout)
                for t in tapes]
    states = [(i["complete"], i["continues"]) for lst in listings for i in lst["images"]]
    assert states == [(False, True)] * (len(tapes) - 1) + [(True, False)]
    back = os.path.join(folder, "back.img")
    r = bx("restore", back, "--tape", t1, "--image", "1", "--next-tape", nxt)
    assert r.returncode == 0, r.stderr
    assert bx("read", f"{back}@{top}").stdout == bx("read", f"{vol}@{top}").stdout
    return listings


@pytest.mark.parametrize("geometry, record_size", first_fast([
    (["--capacity", "32M"], "256K"),                                  # the case
    (["--capacity", "8M", "--early-warning", "576K"], "256K"),
    (["--capacity", "4M", "--early-warning", "192K",
      "--record-size", "64K"], "64K"),
    (["--capacity", "24M", "--early-warning", "4M"], "256K"),           # a roomy zone
    (["--capacity", "16M", "--early-warning", "2112K",
      "--record-size", "1M"], "1M"),
], 2))
def test_spanning_with_any_early_warning(volume: str, tmp_path: object, geometry: list[str],
                                         record_size: str) -> None:
    _dump_and_restore(volume, "full", "full", str(tmp_path), *geometry,
                      record_size=record_size, verify=record_size == "256K")


def test_location_rows_that_do_not_fit_are_carried(scattered: str, tmp_path: object) -> None:
    """An index record of 16K holds ~800 location rows; the first part has more: they
    are carried into the next part's index, with their own stream offsets."""
    geometry = ["--capacity", "6M", "--early-warning", "96K",
                "--record-size", "16K"]
    _dump_and_restore(scattered, "holes", "holes", str(tmp_path), *geometry,
                      record_size="16K")
    parts = []
    for n in range(1, 3):
        with open_tape(os.path.join(str(tmp_path), f"t{n}.vtape"), write=False) as t:
            parts.append(list_tape(t).images[0].index)
    first, second = parts
    assert first is not None and second is not None
    carried = [r for r in second.records if r[2] < second.stream_start]
    assert carried and max(r[2] for r in first.records) < min(r[2] for r in carried)


@pytest.mark.parametrize("args, words", [
    (["--capacity", "32M", "--early-warning", "64K"], "at least --early-warning 576K"),
    (["--capacity", "1M"], "at least --capacity"),
    (["--capacity", "8M", "--early-warning", "200K", "--record-size", "1M"],
     "at least --early-warning 2112K"),
])
def test_tape_create_refuses_what_cannot_span(tmp_path: object, args: list[str],
                                              words: str) -> None:
    t = os.path.join(str(tmp_path), "t.vtape")
    r = bx("tape", "create", t, *args)
    assert r.returncode == 2 and words in one_line(r) and not os.path.exists(t)


def test_a_cut_index_leaves_the_tape_listable(volume: str, tmp_path: object) -> None:
    """A dump that stopped inside its index (end of medium): that image is listed as
    incomplete, the others stay listed and restorable, and the tape takes more."""
    t = os.path.join(str(tmp_path), "t.vtape")
    assert bx("tape", "create", t, "--capacity", "256M").returncode == 0
    assert bx("dump", volume, "full", "--tape", t).returncode == 0
    key = os.urandom(16)
    desc = tf.Descriptor(key.hex(), "full", "full", None, ["full"], "?", 1, 0)
    idx = tf.Index(key.hex(), 0, 0, 0, True, 0, records=[(1, 1, 0)] * 50000).pack()
    with open_tape(t) as tape:
        tape.seek_eod()
        tape.write_record(tf.pack_record(tf.DESCRIPTOR, key, 0, 0, desc.pack(), 256 * K))
        tape.write_filemarks(1)
        tape.write_record(tf.pack_record(tf.INDEX, key, 0, 0, idx[:256 * K - 40], 256 * K))
    listing = json.loads(bx("tape", "list", t, "--json").stdout)
    assert [i["complete"] for i in listing["images"]] == [True, False]
    assert bx("dump", volume, "full", "--tape", t).returncode == 0
    back = os.path.join(str(tmp_path), "back.img")
    assert bx("restore", back, "--tape", t, "--image", "3").returncode == 0
    r = bx("restore", os.path.join(str(tmp_path), "b2.img"), "--tape", t, "--image", "2")
    assert r.returncode == 2 and "incomplete" in one_line(r)
