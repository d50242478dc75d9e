"""Real NBD clients nobody here wrote, against our server on a Unix socket.

Each test skips, naming the Debian package, when its client is missing
(`tests/apt-packages.txt` lists them for CI). The server runs in this process
over the in-memory fake volume; libnbd's Python binding is the system one
(python3-libnbd), so that test runs a script under /usr/bin/python3.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.nbd.server import Server
from tests.nbd.fakes import FakeVolume

MiB = 1 << 20
SIZE = 64 * MiB
SYSTEM_PYTHON = "/usr/bin/python3"


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not installed (apt-get install {package})")
    return path


def run(*argv: str, timeout: float = 120) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{argv[0]} failed: {r.stderr or r.stdout}"
    return r.stdout


class Served:
    def __init__(self, tmp: Path) -> None:
        self.volume = FakeVolume(SIZE)
        self.volume.write(8 * MiB, b"snapshot" * (MiB // 8))
        self.volume.create_snapshot("s1")
        self.sock = str(tmp / "nbd.sock")
        self.server = Server(self.volume)
        self.server.listen(f"unix:{self.sock}")
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(30)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path)
    yield s
    s.stop()


def pattern_file(path: Path) -> bytes:
    data = bytearray(SIZE)
    for i in range(0, SIZE, 3 * MiB):           # data, then holes: sparse on purpose
        data[i:i + MiB] = os.urandom(MiB)
    path.write_bytes(data)
    return bytes(data)


def test_qemu_img_convert_in_and_out(served: Served, tmp_path: Path) -> None:
    qemu_img = need("qemu-img", "qemu-utils")
    src = tmp_path / "src.raw"
    data = pattern_file(src)
    run(qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src), served.uri())
    assert served.volume.read(0, SIZE) == data
    run(qemu_img, "compare", "-f", "raw", "-F", "raw", str(src), served.uri())
    out = tmp_path / "out.raw"
    run(qemu_img, "convert", "-f", "raw", "-O", "raw", served.uri(), str(out))
    assert out.read_bytes() == data
    snap = tmp_path / "snap.raw"
    run(qemu_img, "convert", "-f", "raw", "-O", "raw", served.uri("@s1"), str(snap))
    assert snap.read_bytes()[8 * MiB:9 * MiB] == b"snapshot" * (MiB // 8)
    info = json.loads(run(qemu_img, "info", "--output=json", served.uri()))
    assert info["virtual-size"] == SIZE


def test_qemu_io_write_read_discard(served: Served) -> None:
    qemu_io = need("qemu-io", "qemu-utils")
    out = run(qemu_io, "-f", "raw", "-c", "write -P 0xab 1M 2M", "-c", "read -P 0xab 1M 2M",
              "-c", "discard 1M 1M", "-c", "read -P 0 1M 1M", "-c", "write -z 2M 4k",
              "-c", "read -P 0 2M 4k", "-c", "flush", "-c", "aio_write -P 0xcd 16M 64k",
              "-c", "aio_flush", "-c", "read -P 0xcd 16M 64k", served.uri())
    assert "Pattern verification failed" not in out
    assert served.volume.read(2 * MiB + 4096, 4) == b"\xab" * 4
    assert served.volume.extents(MiB, MiB)[0][2] is False
    r = subprocess.run([qemu_io, "-f", "raw", "-c", "write 0 4k", served.uri("@s1")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 or "failed" in (r.stdout + r.stderr).lower()


def test_nbdinfo_list_and_map(served: Served) -> None:
    nbdinfo = need("nbdinfo", "libnbd-bin")
    listing = json.loads(run(nbdinfo, "--json", "--list", served.uri()))
    names = {e["export-name"] for e in listing["exports"]}
    assert names == {"", "@s1"}
    extents = json.loads(run(nbdinfo, "--json", "--map", served.uri()))
    holes = [e for e in extents if e["type"] & 1]
    data = [e for e in extents if not e["type"] & 1]
    assert data == [{"offset": 8 * MiB, "length": MiB, "type": 0, "description": "data"}]
    assert sum(e["length"] for e in holes) == SIZE - MiB
    ro = json.loads(run(nbdinfo, "--json", served.uri("@s1")))
    assert ro["exports"][0]["is_read_only"] is True


def test_nbdcopy_in_and_out(served: Served, tmp_path: Path) -> None:
    nbdcopy = need("nbdcopy", "libnbd-bin")
    src = tmp_path / "src.raw"
    data = pattern_file(src)
    run(nbdcopy, "--flush", str(src), served.uri())
    assert served.volume.read(0, SIZE) == data
    out = tmp_path / "out.raw"
    run(nbdcopy, served.uri(), str(out))
    assert out.read_bytes() == data


LIBNBD_SCRIPT = textwrap.dedent("""
    import os, sys, nbd
    uri = sys.argv[1]
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    size = h.get_size()
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    blocks = {i: os.urandom(65536) for i in range(0, size // 65536, 3)}
    cookies = []
    for i, data in blocks.items():                   # all in flight at once
        cookies.append(h.aio_pwrite(data, i * 65536))
        if len(cookies) % 64 == 0:
            h.poll(0)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    h.flush()
    bufs = {i: nbd.Buffer(65536) for i in blocks}
    rc = [h.aio_pread(bufs[i], i * 65536) for i in blocks]
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i, data in blocks.items():
        assert bufs[i].to_bytearray() == data, i
    h.trim(65536, 0)
    seen = []
    h.block_status(size, 0, lambda ctx, off, ents, err: seen.extend(ents) or 0)
    assert seen and sum(seen[0::2]) >= 65536
    h.shutdown()
    print("ok", len(blocks), len(rc))
""")


def test_python_libnbd_many_in_flight(served: Served) -> None:
    if not os.path.exists(SYSTEM_PYTHON) or subprocess.run(
            [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode:
        pytest.skip("Python libnbd binding missing (apt-get install python3-libnbd)")
    out = run(SYSTEM_PYTHON, "-c", LIBNBD_SCRIPT, served.uri())
    assert out.startswith("ok")
    assert served.volume.syncs >= 1 and served.volume.commits >= 1   # flush, then the close
