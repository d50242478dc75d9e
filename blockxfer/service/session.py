"""Sending an image from a volume whether or not a server owns it.

When `blockxfer serve` owns the volume, the server writes the stream (into a
pipe whose far end is copied to the sink here); otherwise the volume is opened
here and read with the drivers' parallel reader. Callers see one function.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from blockxfer import remote
from blockxfer.errors import BlockxferError, DeviceError
from blockxfer.transport.base import ByteSink, Result

PIPE_READ = 1 << 20


def send_to(path: str, expression: str, out: ByteSink, *, compress: bool = True,
            implicit: bool = False, resume: str | None = None, geometry: Any = None,
            progress: Callable[[int], None] | None = None) -> Result:
    """Write the stream of `expression` on the volume at `path` into `out`.

    Nothing is written to `out` before the image was planned, so a bad expression
    or resume token is refused with `out` untouched."""
    if remote.server_for(path) is not None:
        return _served(path, expression, out, compress, implicit, resume, progress)
    return _local(path, expression, out, compress, implicit, resume, geometry, progress)


def _local(path: str, expression: str, out: ByteSink, compress: bool, implicit: bool,
           resume: str | None, geometry: Any, progress: Callable[[int], None] | None) -> Result:
    from blockxfer.drivers.reader import read_runs
    from blockxfer.handles import open_volume
    from blockxfer.stream.send import plan_send, stream_plan
    with open_volume(path) as vol:
        plan = plan_send(vol, expression, resume=resume, implicit=implicit)
        stats = stream_plan(
            plan, out, lambda runs: read_runs(vol.dev, runs, vol.block_size, geometry=geometry),
            compress=compress, progress=progress)
    return {"records": stats.records, "data_blocks": stats.data_blocks, "bytes": stats.bytes}


def _served(path: str, expression: str, out: ByteSink, compress: bool, implicit: bool,
            resume: str | None, progress: Callable[[int], None] | None) -> Result:
    rfd, wfd = os.pipe()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = remote.send(path, expression, wfd, compress=compress,
                                            implicit=implicit, resume=resume)
        except BlockxferError as e:
            outcome["error"] = e
        finally:
            os.close(wfd)
    t = threading.Thread(target=run, name="served-send", daemon=True)
    t.start()
    with os.fdopen(rfd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(PIPE_READ):
            out.write(chunk)
            if progress:
                progress(len(chunk))
    t.join()
    if "error" in outcome:
        raise outcome["error"]
    if outcome.get("result") is None:
        raise DeviceError(f"the server of {path} stopped before it sent the stream")
    return {**outcome["result"], "served": True}
