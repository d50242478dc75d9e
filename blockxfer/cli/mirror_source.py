"""Opening a mirror's source and destination, and one update of it, for `blockxfer
mirror` and the mirror daemon (blockxfer/cli/mirror_daemon.py).

The unserved path opens the source volume itself for an update's duration; a
volume `blockxfer serve` owns is reached through its service (its control
client), as is a local destination that a service owns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blockxfer.errors import BlockxferError, DeviceBusy, VolumeError


def refuse_served(src: str) -> None:
    """The unserved path opens the volume itself; a served one went to its service
    before (this catches a service started meanwhile). A `replicate pull` holding
    the volume while it receives is waited for (busy: the daemon's next tick, or
    `mirror update` while the daemon runs, tries again)."""
    client = service(src)
    if client is None:
        return
    if _is_pull(client):
        raise DeviceBusy(f"{src} is open in a 'replicate pull' receiving into it; the "
                         "mirror updates when it ends")
    raise VolumeError(f"{src} is served by 'blockxfer serve', which owns it and runs "
                      "its mirror: use 'blockxfer mirror' commands on it again")


def _is_pull(client: Any) -> bool:
    """Is the process holding the volume a pull (service/replication.py's `hosting`),
    not a service? Only a service reports itself (`server`) in `info`."""
    try:
        return "server" not in client.call("info")
    except BlockxferError:                 # it let go meanwhile
        return False


def service(src: str) -> Any:
    """The control client of the service owning `src`, or None."""
    from blockxfer.service.session import server_for
    return server_for(src)


def mirror_target(dest: str, endpoint: str | None = None) -> Any:
    """The destination `dest` opened with the drivers (also for the service);
    `endpoint` is an s3:// destination's. A local volume that `blockxfer serve`
    owns is reached through its service (looked at, rolled back, received into)."""
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.transfer.mirror import open_target
    from blockxfer.transfer.mirror.target import LocalTarget
    target = open_target(dest, open_device, endpoint)
    if isinstance(target, LocalTarget):
        client = service(dest)
        if client is not None:
            from blockxfer.service.mirrordest import ServedTarget
            return ServedTarget(dest, client)
    return target



def increments() -> Any:
    """The incremental-mirroring library, handed the drivers' openers."""
    from blockxfer.transfer import increments

    from .increments import wire
    wire()
    return increments


Publish = Callable[[bytes | None, int], None]


def update_once(src: str, progress: Callable[[int], None] | None = None,
                publish: Publish | None = None) -> dict[str, Any]:
    """One update of the mirror configured on `src`, whichever kind it is;
    `publish(state, generation)` hears the mirror state it leaves in the volume."""
    from blockxfer.drivers.reader import read_runs
    from blockxfer.handles import open_volume
    from blockxfer.transfer.mirror import load, run_update
    from blockxfer.transfer.mirror.state import KEY
    refuse_served(src)
    with open_volume(src, write=True) as vol:
        st = load(vol, src)
        if not st.incremental_mode:
            try:
                return run_update(vol, mirror_target(st.dest, st.ep), progress=progress,
                                  reader=lambda runs: read_runs(vol.dev, runs, vol.block_size))
            finally:
                if publish is not None:
                    publish(vol.get_property(KEY), vol.generation)
    assert st.base_url is not None and st.incr is not None
    result: dict[str, Any] = increments().mirror_update(src, st.base_url, st.incr,
                                                         progress=progress)
    return {"volume": src, "destination": st.incr, **result}
