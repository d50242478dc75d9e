"""What a command does to an open volume: the one implementation, whether the
volume was opened by the command itself or is held open by the service.

`VolumeOps(vol, lock)` runs each operation under the volume lock discipline of
the process that holds the volume. In the service that lock is the NBD server's
(`LockedVolume.lock`): short metadata work (a snapshot, a plan, a commit) holds
it, bulk data is read outside it (the volume's reads are thread-safe, snapshots
being streamed are held against destroy), so NBD clients keep going. Locally the
lock is a private one nobody else takes. Every result is the JSON-able dict the
command prints with `--json`.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, Protocol

from blockxfer.errors import BlockxferError, UsageError
from blockxfer.image import evaluate
from blockxfer.stream.io import ByteSink, ByteSource
from blockxfer.stream.receive import ReceiveResult, receive_into
from blockxfer.stream.send import Reader, plain_reader, plan_send, stream_plan
from blockxfer.units import human
from blockxfer.volume import Volume
from blockxfer.volume.layout import SnapshotEntry

Result = dict[str, Any]
Progress = Callable[[int], None] | None
Freezer = Callable[[str], AbstractContextManager[None]]
ReaderFor = Callable[[Volume, Any], Reader]        # (volume, md geometry or None)


class Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> int | None: ...


# -- what both a local command and the service report ------------------------------------
def snapshot_row(e: SnapshotEntry) -> Result:
    """One snapshot as `blockxfer snapshots --json` lists it."""
    created = datetime.fromtimestamp(e.created / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"name": e.name, "id": e.id, "created": created, "generation": e.generation,
            "shadow": e.shadow, "master": e.master, "blocks": e.blocks,
            "incomplete": e.incomplete, "guid": e.guid.hex()}


def snapshots_listing(vol: Volume) -> Result:
    """`{"snapshots": [...], "pointers": {...}}` for a Volume."""
    return {"snapshots": [snapshot_row(e) for e in vol.snapshots()], "pointers": vol.pointers}


def image_report(vol: Volume, expression: str) -> Result:
    """What `blockxfer image --json` prints: the image's size, top and base, and time."""
    t0 = time.perf_counter()
    info = evaluate(expression, vol, vol.block_size).as_dict()
    info["seconds"] = round(time.perf_counter() - t0, 6)
    return info


def _plain(vol: Volume, geometry: Any) -> Reader:
    return plain_reader(vol)


SPARSE_WINDOW = 1 << 30          # virtual bytes whose extents `read` looks up at once


class VolumeOps:
    """The operations of the commands on one open volume."""

    def __init__(self, vol: Volume, lock: AbstractContextManager[Any] | None = None, *,
                 reader_for: ReaderFor = _plain, freezer: Freezer | None = None,
                 server_info: Callable[[], Result] | None = None) -> None:
        self.vol = vol
        self.lock = lock if lock is not None else threading.Lock()
        self.reader_for, self.freezer, self.server_info = reader_for, freezer, server_info

    @property
    def path(self) -> str:
        return self.vol.dev.path

    # -- metadata --------------------------------------------------------------------------
    def info(self) -> Result:
        with self.lock:
            out: Result = dict(self.vol.info())
        if self.server_info is not None:
            out["server"] = self.server_info()
        return out

    def snapshots(self) -> Result:
        with self.lock:
            return snapshots_listing(self.vol)

    def snapshot(self, name: str, shadow: bool = False, master: bool = False,
                 freeze: str | None = None) -> Result:
        # freeze first, outside the lock: the file system flushes through NBD to us
        with self._frozen(freeze), self.lock:
            self.vol.create_snapshot(name, shadow=bool(shadow), master=bool(master))
            row = snapshot_row(self.vol.resolve(name))
        return {**row, "frozen": freeze}

    def _frozen(self, mountpoint: str | None) -> AbstractContextManager[None]:
        if not mountpoint:
            return nullcontext()
        if self.freezer is None:
            raise UsageError(f"--freeze needs the server that exports {self.path} "
                             "(blockxfer serve)")
        return self.freezer(mountpoint)

    def destroy(self, name: str) -> Result:
        """Destroy a snapshot, or delete a pointer when `name` is one (and no snapshot)."""
        with self.lock:
            vol = self.vol
            pointer = name in vol.pointers and name not in {e.name for e in vol.snapshots()}
            if pointer:
                vol.delete_pointer(name)
            else:
                vol.destroy_snapshot(name)
        return {"destroyed": name, "pointer": pointer}

    def pointer(self, name: str, snapshot: str | None = None, delete: bool = False) -> Result:
        with self.lock:
            if delete:
                self.vol.delete_pointer(name)
                return {"pointer": name, "snapshot": None}
            if not snapshot:
                raise UsageError("name the snapshot the pointer should refer to, "
                                 "or give --delete")
            self.vol.set_pointer(name, snapshot)
        return {"pointer": name, "snapshot": snapshot}

    def image(self, expression: str) -> Result:
        with self.lock:
            return image_report(self.vol, expression)

    def holds(self, op: str = "list", snapshot: str | None = None,
              tag: str | None = None) -> Result:
        """Hold or release a snapshot (`op` "hold" or "release"), or only list; the
        volume's holds afterwards."""
        with self.lock:
            if op == "hold":
                self.vol.hold(str(snapshot), str(tag))
            elif op == "release":
                self.vol.release(str(snapshot), str(tag))
            elif op != "list":
                raise UsageError(f"holds: unknown operation {op!r}")
            held = self.vol.holds()
        return {"holds": {name: sorted(tags) for name, tags in sorted(held.items())}}

    def policy(self, op: str, text: str | None = None, dry_run: bool = False) -> Result:
        """The snapshot schedule (transfer/policy.py): `op` is "set" (`text`, the
        policy as its JSON), "clear", "show" or "run" (one tick, as the job does)."""
        from datetime import UTC, datetime

        from blockxfer.transfer.policy import PROPERTY, policy_status, policy_tick
        with self.lock:
            if op == "set":
                self.vol.set_property(PROPERTY, str(text).encode())
            elif op == "clear":
                self.vol.set_property(PROPERTY, None)
            elif op == "run":
                return asdict(policy_tick(self.vol, dry_run=bool(dry_run)))
            elif op != "show":
                raise UsageError(f"policy: unknown operation {op!r}")
            return policy_status(self.vol, datetime.now(UTC))

    def commit(self) -> None:
        with self.lock:
            self.vol.commit()

    def check(self) -> Result:
        """Every structure and data checksum of the committed state. Pending writes
        are committed first; writes then wait (reads go on) until the check ends, so
        no CP frees a block the check is reading."""
        from blockxfer.volume.check import check_volume
        with self.lock:
            if self.vol.writable:
                self.vol.commit()
            return check_volume(self.vol).as_dict()

    # -- bulk data ---------------------------------------------------------------------------
    def read(self, out: Writable, offset: int, length: int | None = None,
             snapshot: str | None = None, progress: Progress = None) -> Result:
        """The virtual disk (or a snapshot of it) from `offset` into `out`; reads run
        outside the lock. Into a fresh regular file (as `> file` leaves it) unmapped
        ranges become holes: a sparse file."""
        vol = self.vol
        if length is None:
            length = max(vol.virtual_size - offset, 0)
        if offset + length > vol.virtual_size:     # whole, before any chunk is read
            raise UsageError(f"range {offset}+{length} is outside the virtual disk "
                             f"({vol.virtual_size} bytes); 'blockxfer info' shows its size")
        add = progress or (lambda n: None)
        if _fresh_file(out):
            _read_sparse(vol, out, offset, length, snapshot, add)
        else:
            _read_range(vol, out, offset, length, snapshot, add)
        return {"snapshot": snapshot, "offset": offset, "bytes": length}

    def write(self, chunks: Iterable[bytes], offset: int, progress: Progress = None) -> Result:
        """Write the chunks at `offset`, then commit. On an error what came before it
        is committed, and the error says how much. An offset past the end is refused
        before anything is read, also when no data follows."""
        if offset > self.vol.virtual_size:
            raise UsageError(f"offset {offset} is past the end of the virtual disk "
                             f"({self.vol.virtual_size} bytes); 'blockxfer info' shows its size")
        done = offset
        failed: BlockxferError | None = None
        try:
            for chunk in chunks:
                with self.lock:
                    self.vol.write(done, chunk)
                done += len(chunk)
                if progress:
                    progress(len(chunk))
        except BlockxferError as e:
            failed = e
        self.commit()
        if failed is not None:
            kept = "nothing was written" if done == offset else (
                f"{human(done - offset)} ({done - offset} bytes) from offset {offset} were "
                "written and committed, the rest was not")
            raise type(failed)(f"{failed}; {kept}") from failed
        return {"offset": offset, "bytes": done - offset}

    def send(self, out: ByteSink, expression: str, compress: bool = True,
             implicit: bool = False, resume: str | None = None, geometry: Any = None,
             progress: Progress = None) -> Result:
        """Plan under the lock, then stream outside it with the image's snapshots held
        against destroy (their blocks stay put). Nothing reaches `out` before the plan
        is made, so a bad expression or token leaves it untouched."""
        with ExitStack() as held:
            with self.lock:          # held before the lock goes (a receive may commit)
                plan = plan_send(self.vol, expression, resume=resume, implicit=bool(implicit))
                held.enter_context(self.vol.holding(plan.tops))
            stats = stream_plan(plan, out, self.reader_for(self.vol, geometry),
                                compress=bool(compress), progress=progress)
        return {"records": stats.records, "data_blocks": stats.data_blocks,
                "bytes": stats.bytes}

    @contextmanager
    def holding(self, expression: str) -> Iterator[None]:
        """The image's snapshots held against destroy (for a dump streaming them),
        from before the lock goes (a receive may commit as soon as it does)."""
        with ExitStack() as held:
            with self.lock:
                tops = evaluate(expression, self.vol, self.vol.block_size).tops
                held.enter_context(self.vol.holding(tops))
            yield

    # -- tape ----------------------------------------------------------------------------------
    def dump(self, expression: str, tape: str, *, open_tape: Any, next_tape: Any = None,
             label: str | None = None, record_size: int, compress: bool = True,
             progress: Progress = None) -> Result:
        """Append the image to the tape, its snapshots held against destroy meanwhile."""
        from blockxfer.transfer.dump import dump_image
        with self.holding(expression):
            res = dump_image(self.vol, expression, tape, open_tape=open_tape,
                             next_tape=next_tape, label=label, record_size=record_size,
                             reader=self.reader_for(self.vol, None), compress=compress,
                             progress=progress)
        return {"image": res.image, "tapes": list(res.tapes), "blocks": res.blocks,
                "bytes": res.bytes, "set_id": res.set_id, "seq": res.seq,
                "image_id": res.image_id}

    def receive(self, src: ByteSource, source_hint: str = "SOURCE", retry: str | None = None,
                progress: Progress = None) -> ReceiveResult:
        """An incremental stream applied to this open volume (see `receive_into`)."""
        return receive_into(src, self.vol, lock=self.lock, source_hint=source_hint,
                            retry=retry, progress=progress)

    def restore(self, tape: str, *, open_tape: Any, next_tape: Any = None,
                image: int | None = None, snapshot: str | None = None,
                progress: Progress = None) -> list[Result]:
        """Incremental images from tape applied to this open volume, bases first."""
        from blockxfer.transfer.restore import restore_images
        with self.lock:
            have = {e.name for e in self.vol.snapshots() if not e.incomplete and not e.shadow}

        def receive(reader: ByteSource, target: str, open_device: Any, *, force: bool,
                    retry: str | None, progress: Progress) -> ReceiveResult:
            return self.receive(reader, retry=retry, progress=progress)
        steps = restore_images(tape, self.path, open_tape=open_tape, open_device=_no_device,
                               next_tape=next_tape, image=image, snapshot=snapshot,
                               target_has=have.__contains__, progress=progress,
                               receive=receive)
        return [{"image": st.image, "result": receive_result(st.result)} for st in steps]


def _read_range(vol: Volume, out: Writable, offset: int, length: int, snap: str | None,
                add: Callable[[int], None]) -> None:
    bs = vol.block_size
    head = min(length, -offset % bs)           # unaligned edges go the slow way
    body = (length - head) // bs * bs
    if head:
        out.write(vol.read(offset, head, snapshot=snap))
    for view in vol.iter_read(offset + head, body, snapshot=snap):
        out.write(view)
        add(len(view))
    tail = length - head - body
    if tail:
        out.write(vol.read(offset + head + body, tail, snapshot=snap))


def _fresh_file(out: Writable) -> bool:
    """Is `out` a regular file with nothing at or after its position (as `> file`
    leaves it)? Then skipping over a hole leaves zeros, and a sparse file."""
    try:
        fd = out.fileno()  # type: ignore[attr-defined]
        st = os.fstat(fd)
        return stat.S_ISREG(st.st_mode) and os.lseek(fd, 0, os.SEEK_CUR) >= st.st_size
    except (AttributeError, OSError, ValueError):
        return False


def _read_sparse(vol: Volume, out: Any, offset: int, length: int, snap: str | None,
                 add: Callable[[int], None]) -> None:
    """Unmapped ranges become holes in the output file: seek over them, and set the
    file's size at the end (a trailing hole is no write at all)."""
    end = offset + length
    for start in range(offset, end, SPARSE_WINDOW):      # map lookups in bounded pieces
        for off, n, mapped in vol.extents(start, min(SPARSE_WINDOW, end - start), snap):
            if mapped:
                _read_range(vol, out, off, n, snap, add)
                continue
            out.seek(n, os.SEEK_CUR)
            add(n)
    out.flush()
    os.ftruncate(out.fileno(), out.tell())


def _no_device(*args: Any, **kwargs: Any) -> Any:
    raise UsageError("a served volume is received into through its service, not reopened")


def receive_result(r: ReceiveResult) -> Result:
    return {"top": r.top, "incremental": r.incremental, "blocks": r.blocks,
            "released": list(r.released), "incomplete": list(r.incomplete),
            "resumed": r.resumed}
