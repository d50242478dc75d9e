"""The catalog: its schema and migrations, a catalog that cannot be written (a warning,
never a failed backup), stream files, pools and retention with `tape erase`, errors
as one line, and barcodes: a dump through a changer records them, `tape list` shows
them, and a restore guided by the catalog asks the changer for them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockxfer import cli
from blockxfer.catalog import db as catdb
from blockxfer.drivers.changer import Changer
from blockxfer.drivers.vtape import create_virtual_tape
from blockxfer.errors import DeviceError
from tests.clihelp import bx
from tests.fake_mtx import FakeMtx, make_library
from tests.test_stream import snapshot_contents
from tests.test_tape_dump import LEVELS, src  # noqa: F401

MiB = 1 << 20


@pytest.fixture
def catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cat" / "catalog.db"
    monkeypatch.setenv("BLOCKXFER_CATALOG", str(path))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> dict:
    rc = cli.main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert rc == code, err
    return json.loads(out) if code == 0 else {"stderr": err}


# -- schema --------------------------------------------------------------------------------------
def test_schema_is_versioned_wal_and_migrated_once(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    db = catdb.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [tuple(r)[0] for r in db.execute("SELECT version FROM migrations")] == [1]
    db.close()
    db = catdb.connect(path)                 # again: nothing to do
    assert db.execute("SELECT count(*) FROM migrations").fetchone()[0] == catdb.SCHEMA_VERSION
    db.execute("INSERT INTO migrations VALUES (99, 0)")
    db.close()
    with pytest.raises(DeviceError, match="schema version 99, newer"):
        catdb.connect(path)


def test_processes_opening_a_new_catalog_at_once_migrate_it_once(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    code = ("import sys; from blockxfer.catalog.db import connect; "
            "connect(sys.argv[1]).close()")
    procs = [subprocess.Popen([sys.executable, "-c", code, path], stderr=subprocess.PIPE)
             for _ in range(6)]
    errors = [p.communicate()[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    db = catdb.connect(path)
    assert db.execute("SELECT count(*) FROM migrations").fetchone()[0] == catdb.SCHEMA_VERSION


def test_migrations_split_into_whole_statements() -> None:
    """_migrate runs each migration statement by statement (inside its transaction)."""
    import sqlite3
    for script in catdb.MIGRATIONS:
        for statement in script.split(";"):
            assert not statement.strip() or sqlite3.complete_statement(statement + ";"), statement


def test_catalog_path_option_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLOCKXFER_CATALOG", raising=False)
    assert catdb.catalog_path() == "/var/lib/blockxfer/catalog.db"
    monkeypatch.setenv("BLOCKXFER_CATALOG", "/tmp/x.db")
    assert catdb.catalog_path() == "/tmp/x.db"
    assert catdb.catalog_path("/tmp/y.db") == "/tmp/y.db"


# -- a catalog that cannot be written ------------------------------------------------------------
def test_unwritable_catalog_is_a_warning_not_a_failed_dump(src: tuple[str, dict[str, bytes]],  # noqa: F811
                                                           tmp_path: Path) -> None:
    path, _ = src
    tape = str(tmp_path / "t.vtape")
    create_virtual_tape(tape, 64 * MiB)
    blocker = tmp_path / "file"
    blocker.write_text("")                   # a file where the catalog's folder would be
    r = bx("dump", path, "june1", "--tape", tape, "--catalog", str(blocker / "c.db"))
    err = r.stderr.decode()
    assert r.returncode == 0
    warn = [ln for ln in err.splitlines() if "catalog" in ln]
    assert len(warn) == 1 and "warning" in warn[0] and "catalog import" in warn[0], err
    assert "image 1" in r.stdout.decode()


# -- stream files --------------------------------------------------------------------------------
def test_send_o_file_is_catalogued_and_restored(src: tuple[str, dict[str, bytes]], tmp_path: Path,  # noqa: F811
                                                catalog: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path, contents = src
    full, inc = str(tmp_path / "j3.bs"), str(tmp_path / "j5.bs")
    assert cli.main(["send", path, LEVELS[0], "-o", full, "--verify"]) == 0
    assert cli.main(["send", path, LEVELS[1], "-o", inc]) == 0
    capsys.readouterr()
    steps = run(capsys, "catalog", "where", f"{path}@june5")["steps"]
    assert [(s["kind"], s["level"], s["media"][0]["path"]) for s in steps] == \
        [("file", 0, full), ("file", 1, inc)]
    assert steps[0]["verified"] and not steps[1]["verified"]
    assert steps[0]["written"] and steps[0]["bytes"] == os.path.getsize(full)
    target = str(tmp_path / "r.img")
    plan = run(capsys, "restore", target, "--snapshot", "june5", "-n")
    assert plan["dry_run"] and len(plan["steps"]) == 2 and not os.path.exists(target)
    run(capsys, "restore", target, "--snapshot", "june5")
    got = snapshot_contents(target)
    assert got["june5"] == contents["june5"] and got["june3"] == contents["june3"]
    # a target that is the volume at june3 takes only the increment; another volume
    # that happens to have a june3 is not taken for it
    part = str(tmp_path / "part.img")
    run(capsys, "restore", part, "--snapshot", "june3")
    out = run(capsys, "restore", part, "--snapshot", "june5")
    assert [i["expression"] for i in out["images"]] == [LEVELS[1]]
    assert snapshot_contents(part)["june5"] == contents["june5"]
    other = str(tmp_path / "other.img")
    assert cli.main(["init", other, "--size", "32M", "-q"]) == 0
    assert cli.main(["snapshot", f"{other}@june3", "-q"]) == 0
    assert len(run(capsys, "restore", other, "--snapshot", "june5", "-n")["steps"]) == 2
    # rebuilt from the files
    os.environ["BLOCKXFER_CATALOG"] = str(tmp_path / "again.db")
    assert run(capsys, "catalog", "import", inc)["images"] == 1
    assert run(capsys, "catalog", "import", full)["images"] == 1
    again = run(capsys, "catalog", "where", "june5")["steps"]
    assert [s["image_id"] for s in again] == [s["image_id"] for s in steps]


def test_guided_restore_errors_are_one_line(src: tuple[str, dict[str, bytes]], tmp_path: Path,  # noqa: F811
                                            catalog: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = src
    assert run(capsys, "restore", str(tmp_path / "r.img"), "--snapshot", "nope",
               code=5)["stderr"].count("\n") == 1
    stream = str(tmp_path / "j3.bs")
    assert cli.main(["send", path, LEVELS[0], "-o", stream]) == 0
    os.rename(stream, stream + ".moved")
    capsys.readouterr()
    err = run(capsys, "restore", str(tmp_path / "r.img"), "--snapshot", "june3", code=2)
    assert "needs the stream file" in err["stderr"] and err["stderr"].count("\n") == 1
    assert "nothing was written" in err["stderr"]
    assert not os.path.exists(tmp_path / "r.img")
    err = run(capsys, "restore", str(tmp_path / "r.img"), "--image", "1", code=2)
    assert "need --tape" in err["stderr"]
    # the level 0 from the file, the level 1 from a tape that is gone: the target
    # this restore made is removed again
    os.rename(stream + ".moved", stream)
    tape = str(tmp_path / "t.vtape")
    create_virtual_tape(tape, 64 * MiB)
    assert cli.main(["dump", path, LEVELS[1], "--tape", tape]) == 0
    os.rename(tape, tape + ".away")
    capsys.readouterr()
    err = run(capsys, "restore", str(tmp_path / "r.img"), "--snapshot", "june5", code=2)
    assert "needs tape" in err["stderr"] and not os.path.exists(tmp_path / "r.img")


# -- pools and retention -------------------------------------------------------------------------
def test_pools_retention_and_tape_erase(src: tuple[str, dict[str, bytes]], tmp_path: Path,  # noqa: F811
                                        catalog: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = src
    keep, old = str(tmp_path / "keep.vtape"), str(tmp_path / "old.vtape")
    for t in (keep, old):
        create_virtual_tape(t, 64 * MiB)
    # a dump into a pool that does not exist writes nothing
    err = run(capsys, "dump", path, "june1", "--tape", keep, "--pool", "monthly", code=5)
    assert "catalog pool create monthly" in err["stderr"]
    assert run(capsys, "tape", "erase", keep, "-n")["holds"].startswith("nothing")
    assert run(capsys, "catalog", "pool", "create", "monthly", "--retention", "30d")[
        "retention"] == 30 * 86400
    run(capsys, "dump", path, "june1", "--tape", keep, "--label", "KEEP01", "--pool", "monthly",
        "--verify")
    run(capsys, "dump", path, "june1", "--tape", old, "--label", "OLD01")
    run(capsys, "catalog", "pool", "create", "scratch", "--retention", "0s")
    assert run(capsys, "catalog", "pool", "create", "monthly", "--retention", "1d", code=2)
    assert run(capsys, "catalog", "pool", "create", "x", "--retention", "soon", code=2)
    run(capsys, "catalog", "pool", "assign", "scratch", "OLD01")
    assert run(capsys, "catalog", "pool", "assign", "monthly", "NOSUCH", code=5)
    assert {p["name"]: p["tapes"] for p in run(capsys, "catalog", "pool", "ls")["pools"]} == \
        {"monthly": 1, "scratch": 1}
    verified = {i["media"][0]["label"]: i["verified"]
                for i in run(capsys, "catalog", "ls")["images"]}
    assert verified["KEEP01"] and verified["OLD01"] is None
    expired = run(capsys, "catalog", "expired")["tapes"]
    assert [t["label"] for t in expired] == ["OLD01"]
    # unexpired: one line, exit 5, nothing erased (every record and filemark as it was;
    # the header's saved position is the drive's, which reading the label moves)
    before = Path(keep).read_bytes()[4096:]
    err = run(capsys, "tape", "erase", keep, code=5)["stderr"]
    assert err.count("\n") == 1 and "kept until" in err and "--force" in err
    assert Path(keep).read_bytes()[4096:] == before
    assert run(capsys, "tape", "list", keep)["images"]
    # expired: recycled without --force, and the catalog forgets its images
    run(capsys, "tape", "erase", old)
    assert [i["media"][0]["label"] for i in run(capsys, "catalog", "ls")["images"]] == ["KEEP01"]
    run(capsys, "tape", "erase", keep, "--force")
    assert run(capsys, "catalog", "ls")["images"] == []


# -- barcodes ------------------------------------------------------------------------------------
def _mtx_on_path(tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    mtx = bindir / "mtx"
    repo = Path(__file__).resolve().parent.parent
    mtx.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/mtx.log\n"
                   f"cd {repo} && exec {sys.executable} -m tests.fake_mtx \"$@\"\n")
    mtx.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MTX_STATE", str(state))


def test_barcodes_recorded_listed_and_asked_for(src: tuple[str, dict[str, bytes]], tmp_path: Path,  # noqa: F811
                                                catalog: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path, contents = src
    tapes = [str(tmp_path / f"T{i}.vtape") for i in range(1, 5)]
    for t in tapes:
        create_virtual_tape(t, 5 * MiB, early_warning=1 * MiB)
    drive, state = str(tmp_path / "drive0"), tmp_path / "library.json"
    make_library(state, [drive], [(t, f"BX{i:04d}L8") for i, t in enumerate(tapes, 1)])
    FakeMtx(state)(["-f", "/dev/sg5", "load", "1", "0"])
    _mtx_on_path(tmp_path, state, monkeypatch)
    out = run(capsys, "dump", path, LEVELS[0], "--tape", drive, "--label", "weekly",
              "--changer", "/dev/sg5", "--changer-tapes", "BX0003L8")
    assert out["barcodes"] == {"1": "BX0001L8", "2": "BX0003L8"}
    image = run(capsys, "catalog", "ls")["images"][0]
    assert [(m["seq"], m["barcode"]) for m in image["media"]] == [(1, "BX0001L8"),
                                                                   (2, "BX0003L8")]
    assert run(capsys, "tape", "list", drive)["label"]["barcode"] == "BX0003L8"
    # a restore from the first tape: the changer is asked for tape 2's barcode (the
    # next full slot, 2, holds a blank tape)
    changer = Changer("/dev/sg5")
    changer.unload(3, 0)
    changer.load(1, 0)
    target = str(tmp_path / "r0.img")
    run(capsys, "restore", target, "--tape", drive, "--changer", "/dev/sg5")
    assert snapshot_contents(target)["june3"] == contents["june3"]
    assert changer.status().drive(0).source == 3
    # another tape in the drive; the restore asks the changer for each barcode in turn
    changer.unload(3, 0)
    changer.load(4, 0)
    (tmp_path / "mtx.log").write_text("")
    target = str(tmp_path / "r.img")
    run(capsys, "restore", target, "--snapshot", "june3", "--changer", "/dev/sg5")
    assert snapshot_contents(target)["june3"] == contents["june3"]
    calls = [ln.split()[2:] for ln in (tmp_path / "mtx.log").read_text().splitlines()]
    loads = [c[1] for c in calls if c[0] == "load"]
    assert loads == ["1", "3"], calls          # by barcode: no slot tried for its label
    # the whole library imported into a new catalog: barcodes from the inventory
    before = run(capsys, "catalog", "where", "june3")["steps"]
    changer.unload(3, 0)
    monkeypatch.setenv("BLOCKXFER_CATALOG", str(tmp_path / "rebuilt.db"))
    out = run(capsys, "catalog", "import", "--tape", drive, "--changer", "/dev/sg5")
    assert out["images"] == 2 and len(out["skipped"]) == 2       # the two blank cartridges
    after = run(capsys, "catalog", "where", "june3")["steps"]
    assert [[(m["seq"], m["barcode"]) for m in s["media"]] for s in after] == \
        [[(1, "BX0001L8"), (2, "BX0003L8")]]
    assert [s["image_id"] for s in after] == [s["image_id"] for s in before]
    lib = json.loads(state.read_text())         # every cartridge back in its slot
    assert lib["drives"][0]["tape"] is None and all(s is not None for s in lib["slots"])


def test_restore_refuses_a_tape_the_catalog_does_not_name(
        src: tuple[str, dict[str, bytes]], tmp_path: Path, catalog: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = src
    tape, other = str(tmp_path / "t.vtape"), str(tmp_path / "o.vtape")
    for t in (tape, other):
        create_virtual_tape(t, 64 * MiB)
    assert cli.main(["dump", path, "june1", "--tape", tape, "--label", "A"]) == 0
    assert cli.main(["tape", "label", other, "B"]) == 0
    capsys.readouterr()
    os.rename(tape, tape + ".away")          # not where the catalog saw it
    err = run(capsys, "restore", str(tmp_path / "r.img"), "--snapshot", "june1",
              "--next-tape", f"echo {other}", code=5)["stderr"]
    assert "does not hold tape 'A'" in err and err.count("\n") == 1
    err = run(capsys, "restore", str(tmp_path / "r.img"), "--snapshot", "june1",
              code=2)["stderr"]
    assert f"needs tape 'A' (tape 1 of set 'A'), last seen at {tape}" in err
    assert err.count("\n") == 1 and not os.path.exists(tmp_path / "r.img")
    os.rename(tape + ".away", tape)
    run(capsys, "restore", str(tmp_path / "r.img"), "--snapshot", "june1")
