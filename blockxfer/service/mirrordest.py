"""A mirror's destination that a service owns: a local volume `blockxfer serve` holds
open, so the mirror cannot open it itself (docs/mirroring.md).

The service answers the mirror's two questions on its control socket, under its
volume lock, exactly as the far side of `ssh://` or `tls://` answers `inspect`
and `revert` for a volume it opens:

    mirror_inspect          -> what the volume holds (transfer/mirror/target.py's
                               look, as `found_to_dict`): its snapshots, the newest,
                               and the plane an interrupted receive placed
    mirror_revert guid      -> {"discarded": bool}: back to the mirror's last
                               snapshot (local writes and snapshots discarded)

`ServedTarget` is the mirror's side: the look, the rollback, and the stream into
the service's `receive` (incremental only: a served volume keeps its users), so
an interrupted update resumes block by block and local writes there are rolled
back at the next update, as for a destination the mirror opens itself.
"""

from __future__ import annotations

import os
from typing import Any

from blockxfer.errors import UsageError, VolumeError
from blockxfer.transfer.mirror.target import (
    Found,
    WriteStream,
    beside,
    found_from_dict,
    found_in,
    found_to_dict,
)

from .control import ControlServer
from .ops import Result, VolumeOps

PLANE_TEXT = 512 << 10       # a received plane's runs as text on the control socket, at most
OUT_BUFFER = 1 << 20
RETRY = "the mirror resumes it at its next update"


class DestinationCommands:
    """The service's side: the look and the rollback of the volume it owns."""

    def __init__(self, ops: VolumeOps) -> None:
        self.ops = ops

    def install(self, ctl: ControlServer) -> None:
        ctl.register("mirror_inspect", self.inspect)
        ctl.register("mirror_revert", self.revert)

    def inspect(self) -> Result:
        with self.ops.lock:
            return found_to_dict(found_in(self.ops.vol), PLANE_TEXT)

    def revert(self, guid: str) -> Result:
        try:
            want = bytes.fromhex(str(guid))
        except ValueError as e:
            raise UsageError(f"mirror_revert: {guid!r} is not a snapshot guid") from e
        vol = self.ops.vol
        with self.ops.lock:
            name = next((e.name for e in vol.snapshots() if e.guid == want), None)
            if name is None:
                raise VolumeError(f"{self.ops.path} no longer holds the mirror's last "
                                  "snapshot; start the mirror again with --force (a full "
                                  "image, into the volume when it is not served)")
            return {"discarded": vol.revert_to_received(name)}


class ServedTarget:
    """The mirror's side of a destination a service owns (its control client)."""

    def __init__(self, path: str, client: Any) -> None:
        self.name = self.path = path
        self.client = client

    def look(self, thorough: bool = False) -> Found:
        return found_from_dict(self.client.call("mirror_inspect"))

    def holds_newest(self, name: str, guid: bytes) -> bool:
        return self.look().newest == guid

    def discard_local_changes(self, guid: bytes) -> bool:
        return bool(self.client.call("mirror_revert", guid=guid.hex())["discarded"])

    def receive(self, write: WriteStream, *, force: bool) -> dict[str, Any]:
        """The stream goes through a pipe to the service's `receive`, written here
        by a thread; a full stream is refused there (the volume is served)."""
        rfd, wfd = os.pipe()

        def send() -> Any:
            with os.fdopen(wfd, "wb", buffering=OUT_BUFFER) as pipe:
                return write(pipe)

        def take() -> Any:                    # `rfd` is handed over: closed once sent
            return self.client.call("receive", fds=[rfd], handover=True, timeout=None,
                                    source_hint="(the mirror)", retry=RETRY)
        res, stats = beside(send, take)
        return {"top": res["top"], "blocks": res["blocks"], "resumed": res["resumed"],
                "stats": stats}
