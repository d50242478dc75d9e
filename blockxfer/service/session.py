"""A volume as a command sees it: opened here, or served by the process that owns it.

`with open_session(path, write=...) as s:` gives a `LocalSession` over the volume
opened here, or a `ServedSession` that sends each operation to the service
owning it (`blockxfer serve`), found by whatever name either side used (its loop
device, backing file, a symlink: `drivers.owner.owner_path`). Both offer the
same methods with the same results (`VolumeOps`), so a command is written once.

Bulk data never travels as JSON. `read` hands the service the client's own
output descriptor and `write` its input descriptor (SCM_RIGHTS): the service
streams directly to or from them. `send` and `receive` go through a pipe (the
sink or source may be a file being written atomically, ssh, tls...), one end
handed to the service, the other copied here. Errors from the service arrive as
the same error class with the same one line and exit code.

A receive or restore may make a new volume, so they are not session methods but
functions on a path (`receive_to`, `restore_to`) that fork the same way.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, BinaryIO

from blockxfer.errors import BlockxferError, DeviceError, UsageError
from blockxfer.stream.receive import ReceiveResult

from . import control
from .fdio import WRITE_CHUNK, InputChunks
from .ops import Result, VolumeOps

if TYPE_CHECKING:       # the tape modules only when a command uses a tape
    from blockxfer.stream.io import ByteSink, ByteSource
    from blockxfer.stream.send import Reader
    from blockxfer.transfer.restore import RestoreStep
    from blockxfer.transfer.tapeset import NextTape, OpenTape
    from blockxfer.volume import Volume

PIPE_CHUNK = 1 << 20
Progress = Callable[[int], None] | None


# -- finding the owner ----------------------------------------------------------------------
class ControlClient:
    """Talks to the service that owns one volume."""

    def __init__(self, path: str) -> None:
        self.path = path

    def call(self, command: str, **args: Any) -> Any:
        return control.call(self.path, command, **args)


def server_for(path: str) -> ControlClient | None:
    """The service that owns `path`'s volume, whatever name either side used; None
    when nobody serves it."""
    if control.server_running(path):
        return ControlClient(path)
    from blockxfer.drivers.owner import owner_path
    seen = owner_path(path)
    if seen is not None and control.server_running(seen):
        return ControlClient(seen)
    return None


@contextmanager
def open_session(path: str, *, write: bool = False) -> Iterator[Session]:
    """The volume at `path`: served (through its service) or opened here."""
    client = server_for(path)
    if client is not None:
        yield ServedSession(client)
        return
    from blockxfer.handles import open_volume
    with open_volume(path, write=write) as vol:
        yield LocalSession(vol)


def parallel_reader(vol: Volume, geometry: Any) -> Reader:
    """Reads through the drivers' parallel reader (striped across md members when
    `geometry` says so)."""
    from blockxfer.drivers.reader import read_runs
    return lambda runs: read_runs(vol.dev, runs, vol.block_size, geometry=geometry)


# -- the two kinds of session ---------------------------------------------------------------
class LocalSession:
    """The volume opened by this command."""

    served = False

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.ops = VolumeOps(vol, reader_for=parallel_reader)

    def info(self) -> Result:
        return self.ops.info()

    def snapshots(self) -> Result:
        return self.ops.snapshots()

    def snapshot(self, name: str, *, shadow: bool = False, master: bool = False,
                 freeze: str | None = None) -> Result:
        return self.ops.snapshot(name, shadow, master, freeze)

    def destroy(self, name: str) -> Result:
        return self.ops.destroy(name)

    def pointer(self, name: str, snapshot: str | None = None, delete: bool = False) -> Result:
        return self.ops.pointer(name, snapshot, delete)

    def image(self, expression: str) -> Result:
        return self.ops.image(expression)

    def holds(self, op: str = "list", snapshot: str | None = None,
              tag: str | None = None) -> Result:
        return self.ops.holds(op, snapshot, tag)

    def policy(self, op: str, text: str | None = None, dry_run: bool = False) -> Result:
        return self.ops.policy(op, text, dry_run)

    def check(self) -> Result:
        return self.ops.check()

    def read(self, out: BinaryIO, offset: int, length: int | None = None,
             snapshot: str | None = None, progress: Progress = None) -> Result:
        return self.ops.read(out, offset, length, snapshot, progress)

    def write(self, fd: int, offset: int, progress: Progress = None) -> Result:
        chunks = InputChunks(fd, WRITE_CHUNK)
        try:
            return self.ops.write(chunks, offset, progress)
        finally:
            chunks.stop()

    def send(self, out: ByteSink, expression: str, *, compress: bool = True,
             implicit: bool = False, resume: str | None = None, geometry: Any = None,
             progress: Progress = None) -> Result:
        return self.ops.send(out, expression, compress, implicit, resume, geometry, progress)

    def dump(self, expression: str, tape: str, *, open_tape: OpenTape,
             next_tape: NextTape | None = None, label: str | None = None,
             record_size: int, compress: bool = True, progress: Progress = None) -> Result:
        return self.ops.dump(expression, tape, open_tape=open_tape, next_tape=next_tape,
                             label=label, record_size=record_size, compress=compress,
                             progress=progress)


class ServedSession:
    """The volume a service owns: every operation runs there."""

    served = True

    def __init__(self, client: ControlClient) -> None:
        self.client = client

    def _call(self, command: str, **args: Any) -> Any:
        return self.client.call(command, **args)

    def _dict(self, command: str, **args: Any) -> Result:
        """A command whose answer is an object (every one but restore's)."""
        r = self.client.call(command, **args)
        if not isinstance(r, dict):
            raise DeviceError(f"{self.client.path}: the server answered {command!r} with "
                              f"{type(r).__name__}, not an object")
        return r

    def info(self) -> Result:
        return self._dict("info")

    def snapshots(self) -> Result:
        return self._dict("snapshots")

    def snapshot(self, name: str, *, shadow: bool = False, master: bool = False,
                 freeze: str | None = None) -> Result:
        """With `freeze`, the service freezes the file system mounted there around
        the snapshot (so a client that dies meanwhile cannot leave it frozen)."""
        mountpoint = os.path.abspath(freeze) if freeze else None
        return self._dict("snapshot", name=name, shadow=shadow,
                          master=master, freeze=mountpoint)

    def destroy(self, name: str) -> Result:
        return self._dict("destroy", name=name)

    def pointer(self, name: str, snapshot: str | None = None, delete: bool = False) -> Result:
        return self._dict("pointer", name=name, snapshot=snapshot, delete=delete)

    def image(self, expression: str) -> Result:
        return self._dict("image", expression=expression)

    def holds(self, op: str = "list", snapshot: str | None = None,
              tag: str | None = None) -> Result:
        return self._dict("holds", op=op, snapshot=snapshot, tag=tag)

    def policy(self, op: str, text: str | None = None, dry_run: bool = False) -> Result:
        return self._dict("policy", op=op, text=text, dry_run=dry_run)

    def check(self) -> Result:
        return self._dict("check", timeout=None)

    def read(self, out: BinaryIO, offset: int, length: int | None = None,
             snapshot: str | None = None, progress: Progress = None) -> Result:
        out.flush()                          # the service writes after what is buffered
        r = self._dict("read", fds=[out.fileno()], timeout=None, progress=progress,
                       offset=offset, length=length, snapshot=snapshot)
        if r.get("broken_pipe"):
            raise BrokenPipeError("the reader of standard output went away")
        return r

    def write(self, fd: int, offset: int, progress: Progress = None) -> Result:
        return self._dict("write", fds=[fd], timeout=None,
                          progress=progress, offset=offset)

    def send(self, out: ByteSink, expression: str, *, compress: bool = True,
             implicit: bool = False, resume: str | None = None, geometry: Any = None,
             progress: Progress = None) -> Result:
        """The service writes the stream into a pipe; its far end is copied to `out`."""
        def run(wfd: int) -> Any:
            return self._call("send", fds=[wfd], handover=True, timeout=None,
                              expression=expression, compress=compress, implicit=implicit,
                              resume=resume)
        return {**_pipe_out(run, out, progress), "served": True}

    def dump(self, expression: str, tape: str, *, open_tape: OpenTape | None = None,
             next_tape: NextTape | None = None,
             label: str | None = None, record_size: int, compress: bool = True,
             progress: Progress = None) -> Result:
        """The service writes the tape itself (at the tape's absolute path); when it
        needs the set's next tape it asks, and `next_tape` (run here) finds it."""
        return self._dict("dump", timeout=None, progress=progress,
                          answer=_tape_answers(next_tape), next_tape=next_tape is not None,
                          expression=expression, tape=os.path.abspath(tape), label=label,
                          record_size=record_size, compress=compress)


Session = LocalSession | ServedSession


def _tape_answers(next_tape: NextTape | None) -> Callable[[str, dict[str, Any]], Any] | None:
    """Answers the service's "next_tape" question with the path `next_tape` gives."""
    if next_tape is None:
        return None

    def answer(question: str, args: dict[str, Any]) -> Any:
        if question != "next_tape":
            raise UsageError(f"the server asked for {question!r}, which a tape command "
                             "cannot answer")
        return os.path.abspath(next_tape(str(args.get("set")), int(args.get("seq", 0))))
    return answer


# -- pipes between this process and the service ---------------------------------------------
def _pipe_out(run: Callable[[int], Any], out: ByteSink, progress: Progress) -> Result:
    """`run(wfd)` has the service write into a pipe; copy what arrives to `out`."""
    rfd, wfd = os.pipe()
    outcome: dict[str, Any] = {}

    def call() -> None:                  # `run` hands `wfd` over: it closes it
        try:
            outcome["result"] = run(wfd)
        except BlockxferError as e:
            outcome["error"] = e
    t = threading.Thread(target=call, name="served-send", daemon=True)
    t.start()
    with os.fdopen(rfd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(PIPE_CHUNK):
            out.write(chunk)
            if progress:
                progress(len(chunk))
    t.join()
    if "error" in outcome:
        raise outcome["error"]
    return dict(outcome["result"])


def _pipe_in(run: Callable[[int], Any], src: ByteSource) -> Any:
    """`run(rfd)` has the service read from a pipe; feed it what `src` gives."""
    rfd, wfd = os.pipe()

    def pump() -> None:
        try:
            with os.fdopen(wfd, "wb", buffering=0) as pipe:
                while chunk := src.read(PIPE_CHUNK):
                    pipe.write(chunk)
        except (OSError, BlockxferError):
            pass           # the service stopped reading: its answer says why
    t = threading.Thread(target=pump, name="served-receive", daemon=True)
    t.start()
    result = run(rfd)                    # hands `rfd` over: closed once sent
    t.join()                             # on an error the pump may wait on its source
    return result


# -- commands on a path that may not be a volume yet ---------------------------------------
def send_to(path: str, expression: str, out: ByteSink, *, compress: bool = True,
            implicit: bool = False, resume: str | None = None, geometry: Any = None,
            progress: Progress = None) -> Result:
    """Write the stream of `expression` on the volume at `path` into `out`; nothing
    is written to `out` before the image was planned."""
    with open_session(path) as s:
        return s.send(out, expression, compress=compress, implicit=implicit, resume=resume,
                      geometry=geometry, progress=progress)


def receive_to(path: str, src: ByteSource, *, force: bool = False, seekable: bool = False,
               source_hint: str = "SOURCE", progress: Progress = None) -> ReceiveResult:
    """Apply a stream to the volume (or new volume) at `path`: here, or in the
    service that owns it (incremental streams only: the volume stays served)."""
    client = server_for(path)
    if client is None:
        from blockxfer.drivers.blockdev import open_device
        from blockxfer.stream.receive import receive_stream
        return receive_stream(src, path, open_device, force=force, seekable=seekable,
                              source_hint=source_hint, progress=progress)
    r = _pipe_in(lambda rfd: client.call("receive", fds=[rfd], handover=True, timeout=None,
                                         progress=progress, source_hint=source_hint), src)
    return ReceiveResult(**r)


def restore_to(path: str, tape: str, *, open_tape: OpenTape, next_tape: NextTape | None = None,
               image: int | None = None, snapshot: str | None = None, force: bool = False,
               target_has: Callable[[str], bool] = lambda name: False,
               progress: Progress = None) -> list[RestoreStep]:
    """Restore from tape into the volume (or new volume) at `path`; a served volume
    takes the incremental images, applied by its service."""
    from blockxfer.transfer.restore import RestoreStep, restore_images
    client = server_for(path)
    if client is None:
        from blockxfer.drivers.blockdev import open_device
        return restore_images(tape, path, open_tape=open_tape, open_device=open_device,
                              next_tape=next_tape, image=image, snapshot=snapshot,
                              force=force, target_has=target_has, progress=progress)
    steps = client.call("restore", timeout=None, progress=progress,
                        answer=_tape_answers(next_tape), next_tape=next_tape is not None,
                        tape=os.path.abspath(tape), image=image, snapshot=snapshot)
    return [RestoreStep(s["image"], ReceiveResult(**s["result"])) for s in steps]

