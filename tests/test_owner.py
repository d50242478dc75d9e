"""One owner per volume, without root: the identity function on fakes, the lock on
regular files (aliases by symlink, hard link and relative path, a second process,
SIGKILL), the /proc/locks parser, and that every write-open goes through
`open_device`. The same on real loop devices is tests/test_owner_device.py."""

from __future__ import annotations

import ast
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.drivers import owner
from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.identity import Identity, LoopBacking, decode_dev, identify, loop_backing
from blockxfer.drivers.owner import claim, lock_holders, owner_path, parse_locks
from blockxfer.errors import DeviceBusy, DeviceError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    d = str(tmp_path / "run")
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", d)
    return d


# -- identity on fakes ----------------------------------------------------------------
def _stat(kind: int, dev: int, ino: int, rdev: int) -> os.stat_result:
    """An os.stat_result with st_rdev set (the 10-field constructor leaves it 0)."""
    fields = [kind | 0o600, ino, dev, 1, 0, 0, 0, 0, 0, 0]
    extra = {"st_rdev": rdev}
    return os.stat_result(fields, extra)


FILE = _stat(stat.S_IFREG, os.makedev(254, 0), 1234, 0)
LOOP0 = _stat(stat.S_IFBLK, os.makedev(0, 5), 17, os.makedev(7, 0))
LOOP1 = _stat(stat.S_IFBLK, os.makedev(0, 5), 18, os.makedev(7, 1))
SDA = _stat(stat.S_IFBLK, os.makedev(0, 5), 19, os.makedev(8, 0))
NODES = {"/v/vol.img": FILE, "/dev/loop0": LOOP0, "/dev/loop1": LOOP1, "/dev/sda": SDA,
         "/dev/disk/by-id/x": SDA,
         "/dev/loop2": _stat(stat.S_IFBLK, os.makedev(0, 5), 20, os.makedev(7, 2)),
         "/dev/loop3": _stat(stat.S_IFBLK, os.makedev(0, 5), 21, os.makedev(7, 3))}
# loop0 and loop1 both over /v/vol.img; loop2 over sda; loop3 over loop0
LOOPS = {os.makedev(7, 0): LoopBacking(os.makedev(254, 0), 1234),
         os.makedev(7, 1): LoopBacking(os.makedev(254, 0), 1234),
         os.makedev(7, 2): LoopBacking(0, 0, os.makedev(8, 0)),
         os.makedev(7, 3): LoopBacking(0, 0, os.makedev(7, 0))}


def ident(path: str) -> Identity:
    def stat_fn(p: str) -> os.stat_result:
        if p not in NODES:
            raise FileNotFoundError(2, "No such file or directory")
        return NODES[p]
    return identify(path, stat_fn=stat_fn, loop_fn=lambda node, rdev: LOOPS.get(rdev))


def test_loop_devices_are_their_backing_file() -> None:
    assert ident("/dev/loop0") == ident("/dev/loop1") == ident("/v/vol.img")
    assert ident("/v/vol.img") == Identity("file", os.makedev(254, 0), 1234)


def test_block_devices_by_number() -> None:
    assert ident("/dev/sda") == ident("/dev/disk/by-id/x") == Identity("block", os.makedev(8, 0))
    assert ident("/dev/sda") != ident("/v/vol.img")


def test_stacked_loops_are_followed() -> None:
    assert ident("/dev/loop2") == ident("/dev/sda")
    assert ident("/dev/loop3") == ident("/v/vol.img")          # loop over loop over file


def test_keys_differ_and_name_a_file() -> None:
    keys = {ident(p).key for p in ("/v/vol.img", "/dev/sda")}
    assert keys == {"file-254-0-1234", "block-8-0-0"}


def test_not_a_volume() -> None:
    with pytest.raises(DeviceError, match="No such file"):
        ident("/nothing")
    with pytest.raises(DeviceError, match="neither a regular file nor a block device"):
        identify("/dev/null")


def kernel_encode(major: int, minor: int) -> int:
    """new_encode_dev / huge_encode_dev from linux/kdev_t.h."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


@pytest.mark.parametrize("major, minor", [(254, 0), (8, 17), (0, 45), (259, 300), (7, 1 << 19)])
def test_decode_kernel_dev(major: int, minor: int) -> None:
    assert decode_dev(kernel_encode(major, minor)) == os.makedev(major, minor)


def loop_sysfs(tmp_path: Path, rdev: int, backing: str | None) -> Path:
    sysfs = tmp_path / "sys"
    d = sysfs / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}"
    d.mkdir(parents=True)
    if backing is not None:
        (d / "loop").mkdir()
        (d / "loop" / "backing_file").write_text(backing + "\n")
    return sysfs


def test_loop_backing_from_status64(tmp_path: Path) -> None:
    from blockxfer.drivers import ioctls
    sysfs = loop_sysfs(tmp_path, os.makedev(7, 4), "/elsewhere")
    node = tmp_path / "node"
    node.write_bytes(b"")
    raw = ioctls.LOOP_INFO64.pack(kernel_encode(254, 0), 99, 0, 0, 0, 4, 0, 0, 0,
                                  b"", b"", b"", 0, 0)
    got = loop_backing(str(node), os.makedev(7, 4), sysfs=sysfs, ioctl=lambda *_: raw)
    assert got == LoopBacking(os.makedev(254, 0), 99)


def test_loop_backing_falls_back_to_sysfs(tmp_path: Path) -> None:
    f = tmp_path / "b.img"
    f.write_bytes(b"x")
    sysfs = loop_sysfs(tmp_path, os.makedev(7, 4), str(f))

    def refused(*_: object) -> bytes:
        raise OSError(25, "Inappropriate ioctl for device")
    node = tmp_path / "node"
    node.write_bytes(b"")
    got = loop_backing(str(node), os.makedev(7, 4), sysfs=sysfs, ioctl=refused)
    assert got == LoopBacking(os.stat(f).st_dev, os.stat(f).st_ino)
    assert loop_backing(None, os.makedev(7, 4), sysfs=sysfs) == got


def test_not_a_loop_or_detached(tmp_path: Path) -> None:
    sysfs = loop_sysfs(tmp_path, os.makedev(7, 5), None)     # no loop/: nothing attached
    assert loop_backing("/dev/loop5", os.makedev(7, 5), sysfs=sysfs) is None
    assert loop_backing("/dev/sda", os.makedev(8, 0), sysfs=sysfs) is None


# -- /proc/locks ----------------------------------------------------------------------
LOCKS = """\
1: FLOCK  ADVISORY  WRITE 4242 00:19:777 0 EOF
1: -> FLOCK  ADVISORY  WRITE 5151 00:19:777 0 EOF
2: POSIX  ADVISORY  WRITE 99 00:19:777 0 EOF
3: FLOCK  ADVISORY  READ 17 fe:00:777 0 EOF
4: FLOCK  ADVISORY  READ 18 00:19:777 0 EOF
5: OFDLCK ADVISORY  READ -1 fe:00:5522649 203 203
"""


def test_parse_locks() -> None:
    assert parse_locks(LOCKS, (0, 0x19, 777)) == [(4242, True), (18, False)]
    assert parse_locks(LOCKS, (0xFE, 0, 777)) == [(17, False)]


# -- the lock on regular files ------------------------------------------------------------
@pytest.fixture
def vol(tmp_path: Path) -> str:
    path = tmp_path / "vol.img"
    path.write_bytes(bytes(1 << 20))
    return str(path)


HOLD = ("import sys, time\n"
        "from blockxfer.drivers.blockdev import open_device\n"
        "dev = open_device(sys.argv[1], write=sys.argv[2] == 'w')\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")


@pytest.fixture
def holder(vol: str) -> Iterator[subprocess.Popen[str]]:
    """Another process holding `vol` open for writing."""
    with hold(vol, "w") as proc:
        yield proc


class hold:
    def __init__(self, path: str, mode: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD, path, mode], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)

    def __enter__(self) -> subprocess.Popen[str]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == "held\n", self.proc.communicate()[1]
        return self.proc

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def aliases(vol: str, tmp_path: Path) -> list[str]:
    link = tmp_path / "link.img"
    link.symlink_to(vol)
    hard = tmp_path / "hard.img"
    os.link(vol, hard)
    sub = tmp_path / "sub"
    sub.mkdir()
    return [vol, str(link), str(hard), os.path.relpath(vol), f"{sub}/../vol.img"]


@pytest.mark.parametrize("write", [True, False])
def test_every_alias_is_refused_naming_the_owner(
        holder: subprocess.Popen[str], vol: str, tmp_path: Path, write: bool) -> None:
    for name in aliases(vol, tmp_path):
        with pytest.raises(DeviceBusy, match=rf"in use by process {holder.pid} \(.*-c import"):
            open_device(name, write=write)


def test_readers_share_and_keep_writers_out(vol: str) -> None:
    with hold(vol, "r") as reader:
        with open_device(vol) as dev:                           # a second reader is fine
            assert dev.size == 1 << 20
        with pytest.raises(DeviceBusy, match=f"process {reader.pid}"):
            open_device(vol, write=True)


def test_one_process_is_one_owner(vol: str, tmp_path: Path) -> None:
    link = tmp_path / "again.img"
    link.symlink_to(vol)
    with open_device(vol, write=True), open_device(str(link), write=True):
        pass
    with open_device(vol), open_device(str(link), write=True):  # upgrade within the process
        pass
    with hold(vol, "r"):                                        # lock released by close
        pass


def test_sigkilled_owner_leaves_no_stale_lock(vol: str) -> None:
    for _ in range(3):
        with hold(vol, "w") as proc:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert os.listdir(owner.run_dir())          # its file stays, but not its lock
        with open_device(vol, write=True):
            pass
        assert os.listdir(owner.run_dir()) == []    # the next owner removed it


def test_the_last_holder_removes_the_lock_file(vol: str, tmp_path: Path) -> None:
    link = tmp_path / "l.img"
    link.symlink_to(vol)
    with open_device(vol), open_device(str(link)):
        with hold(vol, "r"):
            pass
        assert len(os.listdir(owner.run_dir())) == 1
    assert os.listdir(owner.run_dir()) == []


def test_a_lock_file_removed_meanwhile_is_not_trusted(vol: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The file we opened was removed by its last holder before we locked it: a lock on
    it would exclude nobody, so the claim takes the file now at that name."""
    real = owner._open_lock_file
    opened: list[str | None] = []

    def removed_first(ident: Identity, volume: str) -> tuple[int, str | None]:
        fd, path = real(ident, volume)
        if not opened and path:
            os.unlink(path)
        opened.append(path)
        return fd, path
    monkeypatch.setattr(owner, "_open_lock_file", removed_first)
    with open_device(vol, write=True):
        assert len(opened) == 2
        r = subprocess.run([sys.executable, "-m", "blockxfer.cli", "info", vol], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 4 and f"process {os.getpid()}" in r.stderr, r.stderr


def test_owner_path_is_what_the_writer_opened(vol: str, tmp_path: Path) -> None:
    link = tmp_path / "l.img"
    link.symlink_to(vol)
    assert owner_path(str(link)) is None
    with hold(vol, "w"):
        assert owner_path(str(link)) == os.path.realpath(vol)
    assert owner_path(str(link)) is None                        # record left, holder gone
    with hold(vol, "r"):
        assert owner_path(str(link)) is None                    # readers are not owners


def test_remote_finds_the_server_by_alias(vol: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from blockxfer.service import control
    from blockxfer.service.session import server_for
    link = tmp_path / "l.img"
    link.symlink_to(vol)
    running = {os.path.realpath(vol)}
    monkeypatch.setattr(control, "server_running", lambda p: p in running)
    with hold(vol, "w"):
        client = server_for(str(link))
        assert client is not None and client.path == os.path.realpath(vol)
    assert server_for(str(link)) is None


def test_lock_holders_excludes_this_process(vol: str) -> None:
    c = claim(vol, exclusive=True)
    try:
        fd = os.open(owner.lock_path(c.identity), os.O_RDONLY)
        try:
            assert lock_holders(fd) == []
        finally:
            os.close(fd)
    finally:
        c.release()


# -- one door: every write-open goes through open_device ------------------------------------
# (file, function) pairs allowed to open something for writing without open_device, and why
WRITE_OPENS = {
    ("drivers/blockdev.py", "_create"): "creates the new file open_device then opens",
    ("drivers/blockdev.py", "_open_fd_once"): "open_device's own open",
    ("drivers/owner.py", "_open_lock_file"): "the lock file in the run directory",
    ("drivers/loop.py", "_open"): "a loop's backing file, loop-control, loop nodes (ioctls)",
    ("drivers/scsi.py", "open_scsi"): "SCSI generic nodes (tape, changer)",
    ("drivers/vtape.py", "__init__"): "a virtual tape file",
    ("blockxfer/outfile.py", "_in_place"): "an existing character device or FIFO given as "
                                           "an output (/dev/null); block devices are refused",
    ("blockxfer/cli/app.py", "_drop_stdout"): "/dev/null over a closed standard output",
    ("blockxfer/demo.py", "_prepare"): "the marker file of the demo's own folder",
    ("blockxfer/transfer/objstore/servers.py", "start_seaweedfs"): "the embedded S3 "
                                                                   "server's log file",
    ("blockxfer/transfer/objstore/servers.py", "start_rclone"): "the embedded S3 server's "
                                                                "log file",
    ("blockxfer/cli/mirror_daemon.py", "_write_atomic"): "the mirror daemon's pid and "
                                                         "status files in the run directory",
    ("blockxfer/cli/mirror_daemon.py", "spawn"): "the mirror daemon's log file in the run "
                                                 "directory",
    ("blockxfer/transfer/increments/store.py", "create"): "an increments directory's header "
                                                          "file (never a volume)",
    ("blockxfer/transfer/increments/store.py", "write_slot"): "its header slots",
    ("blockxfer/transfer/increments/store.py", "write_meta"): "its metadata files",
    ("blockxfer/transfer/increments/store.py", "_journal"): "its journal files",
    ("blockxfer/transfer/replicate_state.py", "save"): "a replication target's pull "
                                                       "record (JSON in the state folder)",
}
WRITE_FLAGS = {"O_RDWR", "O_WRONLY", "O_CREAT"}


def write_opens(path: Path) -> list[tuple[str, int]]:
    """(enclosing function, line) of each os.open with a write flag and each
    open(...) with a write mode in one source file."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
            if isinstance(child, ast.Call) and _writes(child):
                found.append((func, child.lineno))
            visit(child, name)
    visit(tree, "<module>")
    return found


def _writes(call: ast.Call) -> bool:
    f = call.func
    if isinstance(f, ast.Attribute) and f.attr == "open" and isinstance(f.value, ast.Name) \
            and f.value.id == "os":
        names = {n.attr for a in call.args[1:] for n in ast.walk(a) if isinstance(n, ast.Attribute)}
        names |= {n.id for a in call.args[1:] for n in ast.walk(a) if isinstance(n, ast.Name)}
        return bool(names & WRITE_FLAGS) or not names <= {"O_RDONLY", "O_CLOEXEC", "os",
                                                          "O_NONBLOCK", "O_DIRECT", "O_EXCL",
                                                          "O_DIRECTORY"}
    if isinstance(f, ast.Name) and f.id == "open":
        mode = call.args[1] if len(call.args) > 1 else next(
            (k.value for k in call.keywords if k.arg == "mode"), None)
        return not (mode is None or (isinstance(mode, ast.Constant)
                                     and set(str(mode.value)) <= set("rbt")))
    return False


def test_every_write_open_goes_through_open_device() -> None:
    """A new open for writing fails this until it is reviewed: if it can reach a volume
    it must go through open_device (owner lock, in-use checks), else it is listed."""
    stray, seen = [], set()
    for src in sorted([*ROOT.glob("blockxfer/**/*.py"), *ROOT.glob("drivers/*.py")]):
        rel = str(src.relative_to(ROOT))
        for func, line in write_opens(src):
            seen.add((rel, func))
            if (rel, func) not in WRITE_OPENS:
                stray.append(f"{rel}:{line} in {func}")
    assert not stray, ("opens for writing outside drivers.blockdev.open_device (a volume "
                       "opened there skips the owner lock and the in-use checks): "
                       + ", ".join(stray))
    assert set(WRITE_OPENS) <= seen, f"stale entries: {set(WRITE_OPENS) - seen}"


def test_file_devices_are_made_only_by_open_device() -> None:
    makers = []
    for src in sorted([*ROOT.glob("blockxfer/**/*.py"), *ROOT.glob("drivers/*.py")]):
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "FileDevice":
                makers.append(str(src.relative_to(ROOT)))
            if isinstance(node, ast.keyword) and node.arg == "lock" \
                    and isinstance(node.value, ast.Constant) and node.value.value is False:
                makers.append(f"{src.relative_to(ROOT)}: lock=False")
    assert makers == ["drivers/blockdev.py"]


def test_without_a_run_directory_the_file_itself_is_locked(
        vol: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who cannot make the run directory (not root: EACCES) still gets one owner
    per file: two such processes, one holding the volume, the other refused naming it."""
    deny = ("import os\n"
            "def deny(*a, **k): raise PermissionError(13, 'Permission denied')\n"
            "os.makedirs = deny\n")
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", str(tmp_path / "none" / "run"))
    holder = subprocess.Popen([sys.executable, "-c", deny + HOLD, vol, "w"], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n", \
            holder.communicate()[1]

        def denied(*a: object, **k: object) -> None:
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(owner.os, "makedirs", denied)
        with pytest.raises(DeviceBusy, match=f"process {holder.pid}"):
            open_device(vol)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "none").exists()


RACE = ("import os, sys, time\n"
        "from blockxfer.drivers.owner import claim\n"
        "from blockxfer.errors import DeviceBusy\n"
        "vol, log, n = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
        "fd = os.open(log, os.O_WRONLY | os.O_APPEND)\n"
        "got = 0\n"
        "while got < n:\n"
        "    try:\n"
        "        c = claim(vol, exclusive=True)\n"
        "    except DeviceBusy:\n"
        "        continue\n"
        "    os.write(fd, b'+%d\\n' % os.getpid()); time.sleep(0.0005)\n"
        "    os.write(fd, b'-%d\\n' % os.getpid())\n"
        "    c.release(); got += 1\n")


def test_racing_claims_never_overlap(vol: str, tmp_path: Path) -> None:
    """Six processes each take the volume 40 times, the lock file removed and made anew
    between owners: the log of who held it never shows two at once."""
    log = tmp_path / "log"
    log.write_bytes(b"")
    procs = [subprocess.Popen([sys.executable, "-c", RACE, vol, str(log), "40"], cwd=ROOT)
             for _ in range(6)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = log.read_text().split()
    assert len(lines) == 6 * 40 * 2
    for start, end in zip(lines[::2], lines[1::2], strict=True):
        assert start[0] == "+" and end == "-" + start[1:], (start, end)
    assert os.listdir(owner.run_dir()) == []
