"""The catalog's must-hold (issue 16): the patent's level 0/1/2 example spread over two
tape sets (virtual tapes, set B spanning three tapes) and an object store (SeaweedFS),
`catalog where` naming the right media in the right order, a restore guided by it
byte-identical, and the same answers from a catalog rebuilt from the media alone.
Everything through the installed command (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.drivers.vtape import create_virtual_tape
from blockxfer.transfer.objstore.servers import START, Server
from tests.clihelp import run as bxrun
from tests.test_stream import make_source, snapshot_contents

MiB = 1 << 20
L0, L1, L2 = "june3 + june2 + june1", "june5 + june4 - june3", "june7 + june6 - june5"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    try:
        srv = START["seaweedfs"](tmp_path_factory.mktemp("seaweedfs"))
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"SeaweedFS not available: {e}")
    with srv:
        yield srv


def bx(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = bxrun(args, env={**os.environ, **env}, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"blockxfer {' '.join(args)}: exit {r.returncode}\n{r.stderr}")
    return r


def where(env: dict[str, str], spec: str) -> list[dict]:
    return json.loads(bx(env, "catalog", "where", spec, "--json").stdout)["steps"]


def media(steps: list[dict]) -> list[tuple[str, ...]]:
    """(kind, expression, where) of each step: tape label and set, or the store."""
    return [(s["kind"], s["expression"],
             *(f"{m['set']}#{m['seq']}" if m["kind"] == "tape" else m["kind"]
               for m in s["media"])) for s in steps]


def test_patent_levels_over_two_tape_sets_and_a_store(server: Server, tmp_path: Path) -> None:
    src = str(tmp_path / "src.img")
    vol = make_source(src)
    want = {e.name: vol.read(0, vol.virtual_size, snapshot=e.name) for e in vol.snapshots()}
    vol.close()
    env = {**server.env(), "BLOCKXFER_CATALOG": str(tmp_path / "catalog.db")}
    a1 = str(tmp_path / "a1.vtape")
    create_virtual_tape(a1, 64 * MiB)
    b = [str(tmp_path / f"b{i}.vtape") for i in (1, 2, 3)]
    for t in b:
        create_virtual_tape(t, 5 * MiB, early_warning=1 * MiB)
    nxt = f"echo {tmp_path}/b$BLOCKXFER_TAPE_SEQ.vtape"

    bx(env, "dump", src, L0, "--tape", a1, "--label", "setA")
    bx(env, "dump", src, L1, "--tape", b[0], "--label", "setB", "--next-tape", nxt)
    bx(env, "dump", src, L2, "--tape", b[1], "--next-tape", nxt)
    chain = where(env, f"{src}@june7")
    assert [s["level"] for s in chain] == [0, 1, 2]
    assert media(chain) == [("tape", L0, "setA#1"), ("tape", L1, "setB#1", "setB#2"),
                            ("tape", L2, "setB#2", "setB#3")]

    # a restore guided by it: the virtual tapes are where the catalog saw them
    r1 = str(tmp_path / "r1.img")
    out = json.loads(bx(env, "restore", r1, "--snapshot", f"{src}@june7", "--json").stdout)
    assert [s["top"] for s in out["images"]] == ["june3", "june5", "june7"]
    got = snapshot_contents(r1)
    assert set(got) == {f"june{d}" for d in range(1, 8)}
    assert all(got[n] == want[n] for n in got)

    # the object store holds june3 and june5: june7 is then its june5 plus tape set B's L2
    store = server.url("site1")
    bx(env, "send", src, "june3", "-o", f"{store}/vol")
    bx(env, "send", src, "june5 - june3", "-o", f"{store}/vol")
    chain = where(env, f"{src}@june7")
    assert media(chain) == [("store", "june5 - june3", "store"),
                            ("tape", L2, "setB#2", "setB#3")]
    assert media(where(env, "june5")) == [("store", "june5 - june3", "store")]
    r2 = str(tmp_path / "r2.img")
    bx(env, "restore", r2, "--snapshot", "june7")
    got = snapshot_contents(r2)
    assert {"june5", "june6", "june7"} <= set(got)
    assert all(got[n] == want[n] for n in got)

    # rebuilt from the media alone, in any order: the same answers (the media name the
    # volume by its uuid, not by a path)
    before = {s: where(env, f"{src}@{s}") for s in ("june3", "june5", "june7")}
    uuid = before["june3"][0]["volume"]
    env["BLOCKXFER_CATALOG"] = str(tmp_path / "rebuilt.db")
    for t in (b[2], b[0], a1, b[1]):
        bx(env, "catalog", "import", "--tape", t)
    bx(env, "catalog", "import", store)
    for snap, steps in before.items():
        again = where(env, f"{uuid}@{snap}" if snap != "june7" else snap)
        assert [(s["image_id"], [m["label"] for m in s["media"]]) for s in again] == \
               [(s["image_id"], [m["label"] for m in s["media"]]) for s in steps], snap
