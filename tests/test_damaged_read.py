"""A damaged data block: `read` fails at once with the virtual offset and VBN (exit 3);
the NBD server answers EIO to the reads that cover it and goes on serving."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import FormatError
from blockxfer.nbd import protocol as p
from blockxfer.stream.inspect import inspect_stream
from blockxfer.volume import Volume
from tests.clihelp import bx, one_line
from tests.nbd.nbdclient import Client
from tests.nbd.serveproc import serve_process

BAD_OFFSET = 3 << 20           # the damaged block's place on the virtual disk


@pytest.fixture
def damaged(tmp_path: object) -> tuple[str, int]:
    """A volume with 8 MiB written, snapshot s1, and the block at BAD_OFFSET damaged."""
    path = os.path.join(str(tmp_path), "v.img")
    assert bx("init", path, "--size", "64M").returncode == 0
    assert bx("write", path, data=os.urandom(8 << 20)).returncode == 0
    assert bx("snapshot", f"{path}@s1").returncode == 0
    vol = Volume.open(open_device(path), writable=False)
    vbn = int(vol.lba.get(BAD_OFFSET // vol.block_size, 1)[0, 0])
    vol.close()
    with open(path, "r+b") as f:
        f.seek(vbn * 4096 + 100)
        f.write(b"\xff" * 8)
    return path, vbn


@pytest.mark.parametrize("target, extra", [
    ("{p}", []), ("{p}@s1", []),
    ("{p}", ["--offset", str(BAD_OFFSET + 5), "--length", "10"]),   # the unaligned path
])
def test_read_fails_naming_offset_and_vbn(damaged: tuple[str, int], target: str,
                                          extra: list[str]) -> None:
    path, vbn = damaged
    r = bx("read", target.format(p=path), *extra, stdout=subprocess.DEVNULL, timeout=60)
    err = one_line(r)
    assert r.returncode == 3, err
    assert f"virtual offset {BAD_OFFSET}" in err and f"VBN {vbn}" in err


def test_read_of_undamaged_range_still_works(damaged: tuple[str, int]) -> None:
    r = bx("read", damaged[0], "--length", "1M", timeout=60)
    assert r.returncode == 0 and len(r.stdout) == 1 << 20


def test_nbd_answers_eio_and_keeps_serving(damaged: tuple[str, int], tmp_path: object,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", str(tmp_path))
    path, _ = damaged
    sock = os.path.join(str(tmp_path), "nbd.sock")
    with serve_process(path, sock):
        c = Client.connect(sock)
        # contiguous reads in flight together (the server batches them): only the
        # one covering the damaged block fails
        for k in range(4):
            c.send(p.CMD_READ, BAD_OFFSET - (2 << 16) + (k << 16), 1 << 16, cookie=k)
        answers = {}
        for _ in range(4):
            error, cookie, _ = c.simple(1 << 16)
            answers[cookie] = error
            if not error:
                c.recv(0)
        assert answers == {0: 0, 1: 0, 2: p.EIO, 3: 0}
        assert len(c.read(0, 4096)) == 4096               # the connection goes on
        c.close()
        assert len(Client.connect(sock).read(1 << 20, 4096)) == 4096   # and the server
        nbdcopy = shutil.which("nbdcopy")
        if nbdcopy:                                       # a real client sees EIO
            r = subprocess.run([nbdcopy, f"nbd+unix:///?socket={sock}", "null:"],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode != 0 and "Input/output error" in r.stderr
            assert len(Client.connect(sock).read(0, 4096)) == 4096


@pytest.mark.parametrize("how", ["file", "stdout"])
def test_send_of_a_damaged_block_fails_naming_the_vbn(damaged: tuple[str, int], tmp_path: object,
                                                      how: str) -> None:
    """The blocks a send streams are checked against their maps' checksums: a damaged
    one stops the send (exit 3, one line naming the VBN) and no trailer is written."""
    path, vbn = damaged
    out = os.path.join(str(tmp_path), "out.bs")
    r = bx("send", path, "s1", "-o", out) if how == "file" else bx("send", path, "s1")
    assert r.returncode == 3, r.stderr
    err = one_line(r)
    assert f"VBN {vbn}" in err and "damaged" in err
    written = r.stdout
    if how == "file" and os.path.exists(out):
        with open(out, "rb") as f:
            written = f.read()
    if written:                                       # what went out is not a whole stream
        with pytest.raises(FormatError):
            inspect_stream(io.BytesIO(written))


def test_dump_of_a_damaged_block_fails_naming_the_vbn(damaged: tuple[str, int],
                                                      tmp_path: object) -> None:
    path, vbn = damaged
    tape = os.path.join(str(tmp_path), "t.vtape")
    assert bx("tape", "create", tape, "--capacity", "64M").returncode == 0
    r = bx("dump", path, "s1", "--tape", tape)
    assert r.returncode == 3, r.stderr
    err = one_line(r)
    assert f"VBN {vbn}" in err
    listing = bx("tape", "list", tape, "--json")
    assert b'"complete": true' not in listing.stdout
