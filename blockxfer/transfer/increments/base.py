"""The base image on its slow medium: a tape (an `st` node or a virtual tape file)
or a stream file. Written once with the ordinary dump/send code, checked to be
the base an increments directory names, and restored with the ordinary restore
and receive (so a base restore is as atomic as theirs)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from blockxfer.device import BlockDevice
from blockxfer.errors import BlockxferError, FormatError, StreamError, UsageError
from blockxfer.outfile import output_file
from blockxfer.stream.decode import StreamReader
from blockxfer.stream.receive import receive_stream
from blockxfer.stream.send import Reader, plain_reader, plan_send, stream_plan
from blockxfer.tape import Tape
from blockxfer.volume import Volume

from .format import Slot

OpenDevice = Callable[..., BlockDevice]
OpenTape = Callable[[str, bool], Tape]
Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class Openers:
    """What opens devices and tapes by path: handed in by the wiring (the CLI or the
    service), since only it may import the drivers."""

    open_device: OpenDevice
    open_tape: OpenTape
    is_tape: Callable[[str], bool]       # is this path an st node or a virtual tape file?


@dataclass(frozen=True)
class Medium:
    kind: str                            # "tape" or "file"
    path: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def parse_base(url: str, is_tape: Callable[[str], bool]) -> Medium:
    """`tape:PATH`, `file:PATH`, or a bare PATH: a character device or a virtual
    tape file is a tape, anything else a stream file."""
    if url.startswith("tape:"):
        return Medium("tape", url[5:])
    if url.startswith("file:"):
        return Medium("file", url[5:])
    if "://" in url:
        raise UsageError(f"--base {url}: the base goes to a tape (tape:/dev/nstN, a virtual "
                         "tape file) or a file, not to a network address")
    if not url:
        raise UsageError("--base needs a tape or a file")
    try:
        mode = os.stat(url).st_mode
    except OSError:
        return Medium("file", url)
    if stat.S_ISCHR(mode) or is_tape(url):
        return Medium("tape", url)
    return Medium("file", url)


def write_base(vol: Volume, expression: str, medium: Medium, o: Openers,
               progress: Progress, *, lock: AbstractContextManager[Any] | None = None,
               reader: Reader | None = None) -> tuple[int, bytes]:
    """Dump or send the base image; (image number on the tape or 0, tape set id).
    `lock` (a service's volume lock) is held to plan, not to stream: the image's
    snapshots are held against destroy meanwhile, as a served `send` or `dump` does."""
    guard = lock if lock is not None else nullcontext()
    read = reader or plain_reader(vol)
    if medium.kind == "tape":
        from blockxfer.image import evaluate
        from blockxfer.transfer.dump import dump_image
        from blockxfer.transfer.tapeset import read_label
        with guard:
            tops = evaluate(expression, vol, vol.block_size).tops
        with vol.holding(tops):
            res = dump_image(vol, expression, medium.path, open_tape=o.open_tape,
                             reader=read, progress=progress)
        tape = o.open_tape(medium.path, False)
        try:
            label = read_label(tape)
        finally:
            tape.close()
        return res.image, label.set_id if label else bytes(16)
    with guard:
        plan = plan_send(vol, expression)
    with vol.holding(plan.tops), output_file(medium.path, replace=False) as f:
        stream_plan(plan, f, read, progress=progress)
    return 0, bytes(16)


def base_file_top(path: str) -> bytes | None:
    """The top snapshot GUID of the stream in a base file (None: no such file)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"cannot read the base {path}: {e.strerror}") from e
    with f:
        return StreamReader(f, path).read_header().top.guid


def check_base(medium: Medium, slot: Slot, o: Openers) -> str:
    """Refuse a base that is not the one the directory was built on (before the
    target is touched); a short description of it otherwise."""
    if medium.kind == "file":
        try:
            top = base_file_top(medium.path)
        except StreamError as e:
            raise StreamError(f"the base {medium.path} is not a readable image stream ({e})"
                              ) from e
        if top is None:
            raise UsageError(f"the base {medium.path} does not exist; give the file the "
                             f"first mirror update wrote ({slot.base_url})")
        if top != slot.base_guid:
            raise StreamError(f"{medium.path} is not the base of these increments (its top is "
                              f"another snapshot than {slot.base_name!r}); give "
                              f"{slot.base_url}")
        return f"file {medium.path}"
    from blockxfer.transfer.restore import pick_image
    from blockxfer.transfer.tapeset import list_tape, read_label
    tape = o.open_tape(medium.path, False)
    try:
        if read_label(tape) is None:
            raise FormatError(f"{medium.path} is blank; insert the tape holding the base "
                              f"({slot.base_url})")
        contents = list_tape(tape)
    finally:
        tape.close()
    if contents.label.set_id != slot.base_set:
        raise UsageError(f"{medium.path} is tape {contents.label.serial!r}, not the one the "
                         f"base was written to ({slot.base_url}); insert that tape")
    try:
        img = pick_image(contents, slot.base_image, None)
    except BlockxferError as e:
        raise UsageError(f"{medium.path}: the base image {slot.base_image} is not usable "
                         f"({e})") from e
    if img.descriptor.top != slot.base_name:
        raise UsageError(f"{medium.path}: image {slot.base_image} is not the base "
                         f"{slot.base_name!r} of these increments")
    return f"tape {medium.path} image {slot.base_image}"


def restore_base(medium: Medium, slot: Slot, target: str, o: Openers, *, force: bool,
                 progress: Progress) -> None:
    """The base image onto `target`, with the ordinary (atomic) restore or receive."""
    if medium.kind == "tape":
        from blockxfer.transfer.restore import restore_images
        restore_images(medium.path, target, open_tape=o.open_tape,
                       open_device=o.open_device, image=slot.base_image, force=force,
                       progress=progress)
        return
    with open(medium.path, "rb") as f:
        receive_stream(f, target, o.open_device, force=force, seekable=True,
                       retry="run the same reintegrate again", progress=progress)
