"""The volume commands a service answers on its control socket.

Each is a `VolumeOps` operation (the same code a command runs on a volume it
opened itself) with the descriptors the client handed over turned into files:
`read` writes into the client's output, `write` reads its input, `send` writes
into and `receive` reads from a pipe whose other end the client copies. The
service owns those descriptors once received and closes them when the command
ends, so the client sees end of file (or a broken pipe) at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from blockxfer.errors import DeviceError

from .control import Ask, ControlServer
from .fdio import WRITE_CHUNK, InputChunks
from .ops import Progress, Result, VolumeOps, receive_result

OpenTape = Callable[[str, bool], Any]
OUT_BUFFER = 1 << 20


class VolumeCommands:
    def __init__(self, ops: VolumeOps, open_tape: OpenTape | None = None) -> None:
        self.ops, self.open_tape = ops, open_tape

    def install(self, ctl: ControlServer) -> None:
        ops = self.ops
        for name, fn in (("info", ops.info), ("snapshots", ops.snapshots),
                         ("snapshot", ops.snapshot), ("destroy", ops.destroy),
                         ("pointer", ops.pointer), ("image", ops.image),
                         ("commit", ops.commit), ("check", ops.check),
                         ("holds", ops.holds), ("policy", ops.policy)):
            ctl.register(name, fn)
        ctl.register("read", self.read, fds=1, progress=True)
        ctl.register("write", self.write, fds=1, progress=True)
        ctl.register("send", self.send, fds=1)
        ctl.register("receive", self.receive, fds=1, progress=True)
        ctl.register("dump", self.dump, progress=True, asks=True)
        ctl.register("restore", self.restore, progress=True, asks=True)

    def read(self, fd: int, progress: Progress, offset: int = 0, length: int | None = None,
             snapshot: str | None = None) -> Result:
        out = os.fdopen(fd, "wb", buffering=OUT_BUFFER)
        try:
            r = self.ops.read(out, offset, length, snapshot, progress)
            out.flush()
            return r
        except BrokenPipeError:          # the client's reader went away (| head): it
            return {"broken_pipe": True}  # ends quietly, as it would reading itself
        except OSError as e:
            raise DeviceError(f"write standard output: {e.strerror}") from e
        finally:
            with contextlib.suppress(OSError):   # closes the descriptor even if the
                out.close()                       # flush fails

    def write(self, fd: int, progress: Progress, offset: int = 0) -> Result:
        chunks = InputChunks(fd, WRITE_CHUNK)
        try:
            return self.ops.write(chunks, offset, progress)
        finally:
            chunks.stop()
            os.close(fd)

    def send(self, fd: int, expression: str, compress: bool = True, implicit: bool = False,
             resume: str | None = None) -> Result:
        try:
            with os.fdopen(fd, "wb", buffering=OUT_BUFFER) as out:
                return self.ops.send(out, expression, compress, implicit, resume)
        except OSError as e:
            raise DeviceError(f"send: the receiving end failed: {e.strerror}") from e

    def receive(self, fd: int, progress: Progress, source_hint: str = "SOURCE",
                retry: str | None = None) -> Result:
        """`retry`: what to do after a cut stream, when the sender cannot `send
        --resume` (a mirror resumes at its next update)."""
        with os.fdopen(fd, "rb", buffering=OUT_BUFFER) as src:
            return receive_result(self.ops.receive(src, source_hint, retry=retry,
                                                   progress=progress))

    def dump(self, progress: Progress, ask: Ask, expression: str, tape: str,
             record_size: int, label: str | None = None, compress: bool = True,
             next_tape: bool = False) -> Result:
        return self.ops.dump(expression, tape, open_tape=self._tapes(),
                             next_tape=_asking(ask) if next_tape else None, label=label,
                             record_size=record_size, compress=compress, progress=progress)

    def restore(self, progress: Progress, ask: Ask, tape: str, image: int | None = None,
                snapshot: str | None = None, next_tape: bool = False) -> list[Result]:
        return self.ops.restore(tape, open_tape=self._tapes(), image=image, snapshot=snapshot,
                                next_tape=_asking(ask) if next_tape else None,
                                progress=progress)

    def _tapes(self) -> OpenTape:
        if self.open_tape is None:
            raise DeviceError("this server was started without tape access")
        return self.open_tape


def _asking(ask: Ask) -> Callable[[str, int], str]:
    """The next tape of a set, as the client finds it (its --next-tape command, its
    changer or its operator): the service asks over the command's connection."""
    def next_tape(set_name: str, seq: int) -> str:
        path = ask("next_tape", set=set_name, seq=seq)
        if not isinstance(path, str) or not path:
            raise DeviceError(f"the client named no tape {seq} of set {set_name!r}")
        return path
    return next_tape
