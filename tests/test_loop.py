"""Real loop devices (root): attach through the ioctls, O_EXCL and in-use refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.loop import attach_loop, detach_loop, loop_info
from blockxfer.drivers.safety import check_writable, device_users
from blockxfer.errors import DeviceBusy

pytestmark = [pytest.mark.root, pytest.mark.device]  # device: the test bed runs it too


@pytest.fixture
def loop(root: None) -> Iterator[tuple[str, str]]:
    backing = f"/var/tmp/bx-test-loop-{os.getpid()}.img"   # tmpfs would refuse direct I/O
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    path = attach_loop(backing)
    try:
        yield path, backing
    finally:
        detach_loop(path)
        os.unlink(backing)


def test_attach_with_direct_io(loop: tuple[str, str]) -> None:
    path, backing = loop
    info = loop_info(os.path.basename(path))
    assert info is not None and info.backing_file == backing and info.direct_io
    with open_device(path, write=True) as dev:
        assert dev.size == 16 << 20 and dev.direct
        assert dev.logical_block_size in (512, 4096)
        buf = bytearray(os.urandom(4096))
        from blockxfer.drivers.blockdev import aligned_buffer
        out = aligned_buffer(4096)
        out[:] = buf
        dev.pwrite(memoryview(out), 8192)
        dev.flush()
        back = aligned_buffer(4096)
        dev.pread(memoryview(back), 8192)
        assert back[:] == buf
        dev.discard(0, 1 << 20)


def test_detach_then_gone(root: None) -> None:
    backing = f"/var/tmp/bx-test-detach-{os.getpid()}.img"
    with open(backing, "wb") as f:
        f.truncate(1 << 20)
    try:
        path = attach_loop(backing)
        detach_loop(path)
        info = loop_info(os.path.basename(path))
        assert info is None or info.backing_file != backing
        detach_loop(path)                     # detaching twice is harmless
    finally:
        os.unlink(backing)


def test_exclusive_holder_is_named(loop: tuple[str, str]) -> None:
    path, _ = loop
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import os,sys; fd=os.open({path!r}, os.O_RDONLY|os.O_EXCL); print('held', flush=True);"
         " sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        users = device_users(path)
        assert users and users[0].kind == "exclusive" and f"pid {holder.pid}" in users[0].detail
        with pytest.raises(DeviceBusy, match=f"pid {holder.pid}"):
            open_device(path, write=True)
        with pytest.raises(DeviceBusy, match="does not change"):
            check_writable(path, force=True)
        with open_device(path) as dev:         # reading is still allowed
            assert dev.size == 16 << 20
    finally:
        holder.communicate("")


def test_backing_file_refused_while_attached(loop: tuple[str, str]) -> None:
    path, backing = loop
    with pytest.raises(DeviceBusy, match=f"loop-backing of {path}"):
        check_writable(backing)


def test_second_writer_refused(loop: tuple[str, str]) -> None:
    path, _ = loop
    with open_device(path, write=True), pytest.raises(DeviceBusy, match="in use"):
        open_device(path, write=True, lock=False)


def test_free_loop_is_writable(loop: tuple[str, str]) -> None:
    assert check_writable(loop[0]).users == ()


def test_fixture_detaches_on_failure(root: None) -> None:
    backing = Path(f"/var/tmp/bx-test-fail-{os.getpid()}.img")
    backing.write_bytes(bytes(1 << 20))
    from blockxfer.drivers.loop import loop_device
    seen = ""
    try:
        with pytest.raises(RuntimeError), loop_device(str(backing)) as path:
            seen = path
            raise RuntimeError("boom")
        info = loop_info(os.path.basename(seen))
        assert info is None or info.backing_file != str(backing)
    finally:
        backing.unlink()
