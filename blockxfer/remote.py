"""Volume commands routed through the server that owns the volume.

While `blockxfer serve` has a volume open it holds the volume's lock, so other
commands cannot open it; they ask the server over its control socket instead.
This module is both ends of that:

- the client side, one function per command (`info`, `snapshots`, `snapshot`,
  `destroy`, `set_pointer`, `delete_pointer`, `image`): each returns the same
  JSON-able result the local command prints with `--json`, or None when no
  server owns the path (then the caller opens the volume itself). The server
  is found whatever name the caller gives (an alias of the served path: its
  loop device, backing file, a symlink), through the locator the wiring hands
  in (`use_locator`);
- the server side, `register(ctl)`, which adds the same commands to a
  `ControlServer`, each run under the server's volume lock.

The listing helpers (`snapshot_row`, `snapshots_listing`, `image_report`) are
what both sides compute, so the output is the same either way. No driver is
imported here: freezing is done by the function the server was handed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from blockxfer.errors import DeviceError, UsageError
from blockxfer.image import evaluate
from blockxfer.nbd import control
from blockxfer.nbd.control import ControlServer, ServerNotRunning
from blockxfer.nbd.exports import LockedVolume
from blockxfer.volume.layout import SnapshotEntry

Result = dict[str, Any]


# -- what both sides report -------------------------------------------------------------
def snapshot_row(e: SnapshotEntry) -> Result:
    """One snapshot as `blockxfer snapshots --json` lists it."""
    created = datetime.fromtimestamp(e.created / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"name": e.name, "id": e.id, "created": created, "generation": e.generation,
            "shadow": e.shadow, "master": e.master, "blocks": e.blocks,
            "incomplete": e.incomplete, "guid": e.guid.hex()}


def snapshots_listing(vol: Any) -> Result:
    """`{"snapshots": [...], "pointers": {...}}` for a Volume."""
    return {"snapshots": [snapshot_row(e) for e in vol.snapshots()], "pointers": vol.pointers}


def image_report(vol: Any, expression: str) -> Result:
    """What `blockxfer image --json` prints: the image's size, top and base, and time."""
    t0 = time.perf_counter()
    info = evaluate(expression, vol, vol.block_size).as_dict()
    info["seconds"] = round(time.perf_counter() - t0, 6)
    return info


# -- client side ------------------------------------------------------------------------
class ControlClient:
    """Talks to the server that owns one volume."""

    def __init__(self, path: str) -> None:
        self.path = path

    def call(self, command: str, **args: Any) -> Any:
        return control.call(self.path, command, **args)


Locator = Callable[[str], "str | None"]


def _no_alias(path: str) -> str | None:
    return None


_owner_path: Locator = _no_alias


def use_locator(locate: Locator) -> None:
    """How a path finds the path its volume's owner opened it by. The control socket
    is named after the server's own path, and only the drivers know that a loop
    device and its backing file (or a symlink, a bind mount, ...) are one volume, so
    the wiring that imports them (`blockxfer.handles`) hands this in."""
    global _owner_path
    _owner_path = locate


def server_for(path: str) -> ControlClient | None:
    """The server that owns `path`'s volume, whatever name either side used; None
    when nobody serves it."""
    if control.server_running(path):
        return ControlClient(path)
    seen = _owner_path(path)
    if seen is not None and control.server_running(seen):
        return ControlClient(seen)
    return None


def try_call(path: str, command: str, **args: Any) -> Any:
    """Run `command` in the server owning `path`; None when there is no server.
    A server that stops between the check and the call counts as none."""
    client = server_for(path)
    if client is None:
        return None
    try:
        return client.call(command, **args)
    except ServerNotRunning:
        return None


def info(path: str) -> Result | None:
    return try_call(path, "info")  # type: ignore[no-any-return]


def send(path: str, expression: str, fd: int, *, compress: bool = True,
         implicit: bool = False, resume: str | None = None) -> Result | None:
    """Have the serving process write the image's stream into `fd` (passed over the
    control socket); None when nobody serves `path`."""
    return try_call(path, "send", fd=fd, timeout=None,  # type: ignore[no-any-return]
                    expression=expression, compress=compress, implicit=implicit,
                    resume=resume)


def snapshots(path: str) -> Result | None:
    return try_call(path, "snapshots")  # type: ignore[no-any-return]


def snapshot(path: str, name: str, *, shadow: bool = False, master: bool = False,
             freeze: str | None = None) -> Result | None:
    """Take a snapshot in the server; with `freeze`, the mounted file system at
    that path is frozen around it (the server does the ioctls, so a client that
    dies meanwhile cannot leave it frozen)."""
    mountpoint = os.path.abspath(freeze) if freeze else None
    return try_call(path, "snapshot", name=name, shadow=shadow,  # type: ignore[no-any-return]
                    master=master, freeze=mountpoint)


def destroy(path: str, name: str) -> Result | None:
    return try_call(path, "destroy", name=name)  # type: ignore[no-any-return]


def set_pointer(path: str, name: str, snapshot: str) -> Result | None:
    return try_call(path, "pointer", name=name, snapshot=snapshot)  # type: ignore[no-any-return]


def delete_pointer(path: str, name: str) -> Result | None:
    return try_call(path, "pointer", name=name, delete=True)  # type: ignore[no-any-return]


def image(path: str, expression: str) -> Result | None:
    return try_call(path, "image", expression=expression)  # type: ignore[no-any-return]


def holds(path: str, op: str, snapshot: str | None = None,
          tag: str | None = None) -> Result | None:
    """`op` is "hold", "release" or "list"; returns the volume's holds afterwards."""
    return try_call(path, "holds", op=op, snapshot=snapshot,  # type: ignore[no-any-return]
                    tag=tag)


# -- server side ------------------------------------------------------------------------
def register(ctl: ControlServer) -> None:
    """Add the volume commands to a server's control socket."""
    _Handlers(ctl).install()


class _Handlers:
    def __init__(self, ctl: ControlServer) -> None:
        self.ctl = ctl
        self.lv: LockedVolume = ctl.vol
        self.vol: Any = ctl.vol.volume          # a Volume: more than the NBD surface

    def install(self) -> None:
        for name in ("info", "snapshots", "snapshot", "destroy", "pointer", "image", "send",
                     "holds"):
            self.ctl.register(name, getattr(self, name))

    def info(self) -> Result:
        with self.lv.lock:
            out: Result = dict(self.vol.info())
        out["server"] = self.ctl.server_info()
        return out

    def snapshots(self) -> Result:
        with self.lv.lock:
            return snapshots_listing(self.vol)

    def snapshot(self, name: str, shadow: bool = False, master: bool = False,
                 freeze: str | None = None) -> Result:
        # freeze first, outside the lock: the file system flushes through NBD to us
        with self.ctl.frozen(freeze), self.lv.lock:
            self.vol.create_snapshot(name, shadow=bool(shadow), master=bool(master))
            row = snapshot_row(self.vol.resolve(name))
        return {**row, "frozen": freeze}

    def destroy(self, name: str) -> Result:
        self.lv.call("destroy_snapshot", name)
        return {"destroyed": name}

    def pointer(self, name: str, snapshot: str | None = None, delete: bool = False) -> Result:
        if delete:
            self.lv.call("delete_pointer", name)
            return {"pointer": name, "snapshot": None}
        if not snapshot:
            raise UsageError("name the snapshot the pointer should refer to, or give --delete")
        self.lv.call("set_pointer", name, snapshot)
        return {"pointer": name, "snapshot": snapshot}

    def send(self, expression: str, fd: int, compress: bool = True, implicit: bool = False,
             resume: str | None = None) -> Result:
        """Plan under the lock, then stream outside it with the image's snapshots held
        against destroy (their blocks stay put): NBD clients are not stalled."""
        from blockxfer.stream.send import plain_reader, plan_send, stream_plan
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            with self.lv.lock:
                plan = plan_send(self.vol, expression, resume=resume, implicit=bool(implicit))
            try:
                with self.vol.holding(plan.tops):
                    stats = stream_plan(plan, out, plain_reader(self.vol),
                                        compress=bool(compress))
            except OSError as e:
                raise DeviceError(f"send: the receiving end failed: {e.strerror}") from e
        return {"records": stats.records, "data_blocks": stats.data_blocks,
                "bytes": stats.bytes}

    def image(self, expression: str) -> Result:
        with self.lv.lock:
            return image_report(self.vol, expression)

    def holds(self, op: str, snapshot: str | None = None, tag: str | None = None) -> Result:
        with self.lv.lock:
            return holds_change(self.vol, op, snapshot, tag)


def holds_change(vol: Any, op: str, snapshot: str | None, tag: str | None) -> Result:
    """Hold or release a snapshot (or only list), then list: both sides do this."""
    if op == "hold":
        vol.hold(snapshot, tag)
    elif op == "release":
        vol.release(snapshot, tag)
    return {"holds": {name: sorted(tags) for name, tags in sorted(vol.holds().items())}}
