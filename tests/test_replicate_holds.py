"""The holds a source keeps for a destination when requests arrive out of order: a
pull killed after sending its request can still be answered (its server waited for
the volume) after the destination's next pull committed a newer master. That stale
request may not release the master the destination now holds, or the destination
is stuck (its newest master gone at the source: only --rollback would do) and its
own children lose their base."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import VolumeError
from blockxfer.stream.send import plain_reader
from blockxfer.transfer import replicate_registry as registry
from blockxfer.transfer.replicate_source import PullRequest, serve_pull
from blockxfer.volume import Volume

MiB = 1 << 20


def _pull(vol: Volume, *have: str, needed: tuple[str, ...] = ()) -> dict[str, object]:
    """Answer a pull of destination B naming `have` (newest first) and the masters
    its own destinations need; the plan."""
    guids = tuple(vol.resolve(n).guid for n in have)
    need = tuple(vol.resolve(n).guid for n in needed)
    plan: dict[str, object] = {}

    def ready(info: dict[str, object]) -> io.BytesIO:
        plan.update(info)
        return io.BytesIO()
    serve_pull(vol, PullRequest("B", "ssh 10.0.0.2", guids, need), ready, plain_reader(vol))
    return plan


@contextmanager
def masters(tmp_path: Path, *names: str) -> Iterator[Volume]:
    """A volume with a master snapshot of each name, each after 1 MiB written."""
    vol = Volume.create(open_device(str(tmp_path / "a.img"), write=True, create_size=16 * MiB))
    try:
        for name in names:
            vol.write(0, os.urandom(MiB))
            vol.create_snapshot(name, master=True)
        yield vol
    finally:
        vol.close()


def test_a_stale_request_keeps_what_the_destination_may_hold(tmp_path: Path) -> None:
    with masters(tmp_path, "m0", "m1", "m2") as vol:
        # B receives m2, telling A that its child still needs m0
        assert _pull(vol, "m1", needed=("m0",))["top"] == "m2"
        vol.write(0, os.urandom(MiB))
        vol.create_snapshot("m3", master=True)
        # a request sent before (its pull was killed), answered only now
        assert _pull(vol, "m1")["expression"] == "m3 - m1"
        for name in ("m2", "m0"):                       # B may hold m2, its child m0
            with pytest.raises(VolumeError, match="held by replicate:B"):
                vol.destroy_snapshot(name)
        plan = _pull(vol, "m2", "m1", needed=("m0",))   # B's next pull
        assert (plan["kind"], plan["base"]) == ("incremental", "m2")
        vol.write(0, os.urandom(MiB))
        vol.create_snapshot("m4", master=True)
        assert _pull(vol, "m3", "m2")["base"] == "m3"   # confirmed the newest sent:
        for name in ("m2", "m1", "m0"):                 # the holds are what it needs
            vol.destroy_snapshot(name)



def test_a_stale_request_does_not_move_confirmed_back(tmp_path: Path) -> None:
    with masters(tmp_path, "m0", "m1", "m2") as vol:
        _pull(vol, "m1")
        _pull(vol, "m2", "m1")                  # B now has m2
        _pull(vol, "m1")                        # a killed pull's request, answered late
        row = registry.load(vol)["B"].row("B")
        assert (row["confirmed"], row["pulls"]) == ("m2", 3)
