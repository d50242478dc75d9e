"""Transports by URL: the wire protocol, file sinks, and ssh:// through a local stand-in.

The stand-in for ssh (`fake_ssh`) runs the far side's command here, so these
tests need no server; tests/test_transport_ssh.py runs the same against a real
sshd, tests/test_transport_tls.py over mutual TLS.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from blockxfer.errors import StreamError, UsageError, VolumeError
from blockxfer.transport import open_sink, open_source, scheme_of, wire
from blockxfer.transport.ssh import SshUrl
from tests.transport_util import bx, ok, same_image, two_snapshots

FAKE_SSH = """#!/bin/sh
# stands in for ssh: drop the options up to "--" and the host, run the command here
while [ "$1" != "--" ]; do shift; done; shift; shift
exec sh -c "$1"
"""


@pytest.fixture
def fake_ssh(tmp_path: Path) -> dict[str, str]:
    script = tmp_path / "fakessh"
    script.write_text(FAKE_SSH)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    from tests.transport_util import BLOCKXFER
    return {"BLOCKXFER_SSH": str(script), "BLOCKXFER_REMOTE_COMMAND": BLOCKXFER}


def test_schemes() -> None:
    assert scheme_of("-") == "-"
    assert scheme_of("/tmp/x.stream") == "file"
    assert scheme_of("file:x") == "file"
    assert scheme_of("ssh://h/x") == "ssh"
    with pytest.raises(UsageError, match="unknown transport 'ftp'"):
        open_sink("ftp://h/x")


def test_ssh_url() -> None:
    assert SshUrl.parse("ssh://root@h:2222/srv/v.img") == SshUrl("root", "h", 2222, "/srv/v.img")
    assert SshUrl.parse("ssh://h/~/v.img").path == "v.img"
    for bad in ("ssh://h", "ssh://h/", "ssh:///x", "ssh://h:x/p"):
        with pytest.raises(UsageError):
            SshUrl.parse(bad)


def test_frames_round_trip() -> None:
    buf = io.BytesIO()
    w = wire.FrameWriter(buf)
    data = os.urandom(3 * wire.FRAME_SIZE + 123)
    for k in range(0, len(data), 1000):
        w.write(data[k:k + 1000])
    w.end()
    wire.write_status(buf, {"top": "b"})
    buf.seek(0)
    r = wire.FrameReader(io.BufferedReader(buf), "peer")
    got = b"".join(iter(lambda: r.read(4096), b""))
    assert got == data and r.ended
    assert wire.read_status(r._r, "peer") == {"top": "b"}


def _frames(raw: bytes) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    while True:
        (n,) = wire.FRAME.unpack_from(raw, pos)
        pos += wire.FRAME.size
        if n == 0:
            return out
        out.append(raw[pos:pos + n])
        pos += n


def test_frames_stay_under_the_limit_and_own_their_bytes() -> None:
    """A write larger than a frame is cut (the reader refuses frames over MAX_FRAME),
    and a small view the caller fills again afterwards goes out as it was."""
    buf = io.BytesIO()
    w = wire.FrameWriter(buf)
    big = os.urandom(wire.MAX_FRAME + wire.FRAME_SIZE + 5)
    reused = bytearray(b"a" * 100)
    w.write(memoryview(reused))
    reused[:] = b"b" * 100
    w.write(memoryview(big))
    w.write(b"tail")
    w.end()
    frames = _frames(buf.getvalue())
    assert max(map(len, frames)) <= wire.MAX_FRAME
    assert b"".join(frames) == b"a" * 100 + big + b"tail"


def test_a_record_body_travels_in_one_frame() -> None:
    """The frame that a record's body fills carries the whole body: the far side
    reads it out of one frame instead of joining two."""
    buf = io.BytesIO()
    w = wire.FrameWriter(buf)
    body = os.urandom(wire.FRAME_SIZE + 40)
    for _ in range(3):
        w.write(b"h" * 24)
        w.write(memoryview(body))
        w.write(b"c" * 8)
    w.end()
    frames = _frames(buf.getvalue())
    assert all(body in f for f in frames[:3])


def test_far_error_keeps_its_class_and_exit_code() -> None:
    buf = io.BytesIO()
    wire.write_status(buf, error=VolumeError("no room"))
    buf.seek(0)
    with pytest.raises(VolumeError, match="peer: no room") as e:
        wire.read_status(buf, "peer")
    assert e.value.exit_code == 5


@pytest.mark.parametrize("line", [b"GET / HTTP/1.0\n", b"BXS1 [1]\n", b"BXS1 {bad\n", b"x" * 70000])
def test_malformed_requests_refused(line: bytes) -> None:
    with pytest.raises(StreamError):
        wire.read_request(io.BytesIO(line))


def test_file_sink_replaces_only_when_finished(tmp_path: Path) -> None:
    target = tmp_path / "s.stream"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), open_sink(str(target)) as sink:
        sink.write(b"new")
        raise RuntimeError("cut")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["s.stream"]
    with open_sink(str(target)) as sink:
        sink.write(b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["s.stream"]


def test_volume_source_needs_an_image() -> None:
    with pytest.raises(UsageError, match="name the image"):
        open_source("ssh://h/v.img")


def test_send_bad_expression_keeps_file(tmp_path: Path) -> None:
    vol = two_snapshots(tmp_path)
    out = tmp_path / "good.stream"
    ok(bx("send", vol, "a", str(out)))
    before = out.read_bytes()
    r = bx("send", vol, "a & nosuch", "-o", str(out))
    assert r.returncode != 0 and out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["good.stream", "vol.img"]


def test_ssh_push_and_pull(tmp_path: Path, fake_ssh: dict[str, str]) -> None:
    vol = two_snapshots(tmp_path)
    copy = tmp_path / "copy.img"
    r = ok(bx("send", vol, "a", f"ssh://h{copy}", env=fake_ssh))
    assert b"received up to 'a'" in r.stderr
    ok(bx("send", vol, "b - a", f"ssh://h{copy}", env=fake_ssh))
    assert same_image(vol, str(copy), "b")
    pulled = tmp_path / "pulled.img"
    ok(bx("receive", str(pulled), f"ssh://h{vol}", "--image", "b + a", env=fake_ssh))
    assert same_image(vol, str(pulled), "a") and same_image(vol, str(pulled), "b")
    assert ok(bx("check", str(pulled))).returncode == 0


def test_ssh_refusals_leave_targets_alone(tmp_path: Path, fake_ssh: dict[str, str]) -> None:
    vol = two_snapshots(tmp_path)
    r = bx("receive", str(tmp_path / "p.img"), f"ssh://h{vol}", "--image", "nosuch", env=fake_ssh)
    assert r.returncode != 0 and b"h: no snapshot or pointer named 'nosuch'" in r.stderr
    assert not (tmp_path / "p.img").exists()
    r = bx("send", vol, "b - a", f"ssh://h{tmp_path}/none.img", env=fake_ssh)
    assert r.returncode == 3, r.stderr          # an incremental needs its base there
    assert b"receive a full stream first" in r.stderr
    assert not (tmp_path / "none.img").exists()
    assert len(r.stderr.decode().strip().splitlines()) == 1


def test_ssh_connection_failure_is_one_line(tmp_path: Path) -> None:
    vol = two_snapshots(tmp_path)
    env = {"BLOCKXFER_SSH": "ssh -o BatchMode=yes -o ConnectTimeout=2 -p 1"}
    r = bx("send", vol, "a", "ssh://127.0.0.1/tmp/x.img", env=env)
    assert r.returncode == 4
    line = r.stderr.decode().strip()
    assert line.startswith("blockxfer: ssh to 127.0.0.1 failed:") and "\n" not in line


def test_stdio_serve_pins_volume_and_operation(tmp_path: Path) -> None:
    vol = two_snapshots(tmp_path)
    request = wire.MAGIC + b'{"op": "send", "volume": "/etc/other.img", "expression": "a"}\n'
    r = bx("stdio-serve", "--volume", vol, data=request)
    assert r.returncode == 4 and r.stdout.startswith(b"ERR ")
    assert b"is for another volume" in r.stdout
    request = wire.MAGIC + f'{{"op": "receive", "volume": "{vol}"}}\n'.encode()
    r = bx("stdio-serve", "--volume", vol, "--allow", "send", data=request)
    assert r.returncode == 4 and b"may not receive here" in r.stdout


class _Channel:
    """A channel whose far side has already answered (`answer`)."""

    peer = "far"

    def __init__(self, answer: bytes) -> None:
        self.reader = io.BufferedReader(io.BytesIO(answer))
        self.writer = io.BytesIO()
        self.aborted = False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True

    def explain(self, e: Exception, cause: OSError | None = None) -> Exception:
        return e


def test_sink_plans_while_the_far_side_starts() -> None:
    """The request goes out at once, its answer is read only at the first write (the
    far side's start-up overlaps this side's planning), and a refusal still comes
    before any stream byte."""
    from blockxfer.transport.endpoint import EndpointSink
    refused = io.BytesIO()
    wire.write_status(refused, error=VolumeError("no room"))
    ch = _Channel(refused.getvalue())
    sink = EndpointSink(ch, "/v.img")                         # type: ignore[arg-type]  # channel double
    assert ch.reader.tell() == 0 and ch.writer.getvalue().startswith(wire.MAGIC)
    sent = len(ch.writer.getvalue())
    with pytest.raises(VolumeError, match="no room"):
        sink.write(b"stream bytes")
    assert ch.aborted and len(ch.writer.getvalue()) == sent


def test_pipes_get_room_for_a_frame() -> None:
    import fcntl
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        wire.widen_pipe(w)
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) >= wire.FRAME_SIZE
        wire.widen_pipe(null)                                # not a pipe: left alone
    finally:
        for fd in (r, w, null):
            os.close(fd)


def test_early_ssh_is_cut_when_the_command_is_refused(tmp_path: Path) -> None:
    """`send ... ssh://` starts ssh before its imports; a refused command cuts it."""
    pids = tmp_path / "pids"
    script = tmp_path / "slowssh"
    script.write_text(f"#!/bin/sh\necho $$ >> {pids}\nexec sleep 60\n")
    script.chmod(0o755)
    env = {"BLOCKXFER_SSH": str(script)}
    r = bx("send", "--verify", str(tmp_path / "v.img"), "a", "ssh://h/x.img", env=env)
    assert r.returncode == 2 and b"--verify" in r.stderr
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(started[0], 0)
    r = bx("send", "-n", str(tmp_path / "v.img"), "a", "ssh://h/x.img", env=env)
    assert len(pids.read_text().split()) == 1             # a dry run connects nowhere


def test_early_ssh_of_a_replication_pull(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`replicate pull ssh://... TARGET` starts ssh before its imports too, but not for
    a served target (its service pulls) nor for --help."""
    import socket

    from blockxfer.cli.entry import _early_url
    from blockxfer.service.control import socket_path
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", str(tmp_path))
    src, target = "ssh://h/srv/v.img", str(tmp_path / "copy.img")
    assert _early_url(["replicate", "pull", src, target, "--name", "b"]) == src
    assert _early_url(["replicate", "pull", "-n", src, target]) is None   # not guessed
    assert _early_url(["replicate", "pull", src, target, "-h"]) is None
    assert _early_url(["replicate", "status", target]) is None
    assert _early_url(["send", "v.img", "a", src]) == src
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(socket_path(target))
        s.listen(1)
        assert _early_url(["replicate", "pull", src, target]) is None
