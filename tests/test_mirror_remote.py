"""A mirror to a volume on another host (`ssh://`, through a stand-in for ssh that
runs the far side's `blockxfer stdio-serve` here): full and incremental updates,
and a kill between the far side's commit and the source's record of it (the far
side is asked, by the header of the snapshot it would send, whether it holds it)."""

from __future__ import annotations

import os
import random
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.errors import BlockxferError, VolumeError
from blockxfer.transfer.mirror import load, run_update
from blockxfer.transfer.mirror import update as update_module
from blockxfer.transfer.mirror.state import MirrorState, PropertyStore
from blockxfer.transfer.mirror.target import UrlTarget
from tests.mirror_util import churn, configure, dest_image, image_of, make_volume
from tests.test_mirror_kill import FAKE_SSH
from tests.transport_util import BLOCKXFER


@pytest.fixture
def far(tmp_path: Path) -> Iterator[tuple[str, str]]:
    ssh = tmp_path / "fake-ssh"
    ssh.write_text(FAKE_SSH)
    ssh.chmod(ssh.stat().st_mode | stat.S_IXUSR)
    old = {k: os.environ.get(k) for k in ("BLOCKXFER_SSH", "BLOCKXFER_REMOTE_COMMAND")}
    os.environ.update(BLOCKXFER_SSH=str(ssh), BLOCKXFER_REMOTE_COMMAND=BLOCKXFER)
    dest = str(tmp_path / "far.img")
    yield dest, f"ssh://localhost{dest}"
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_mirror_over_ssh_and_a_kill_after_the_far_commit(
        tmp_path: Path, far: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    dest, url = far
    vol = make_volume(str(tmp_path / "src.img"), 8 << 20, 1 << 20)
    rng = random.Random(21)
    churn(vol, rng, 60, 0)
    configure(vol, url)
    assert run_update(vol, UrlTarget(url))["kind"] == "full"
    churn(vol, rng)
    r = run_update(vol, UrlTarget(url))
    assert r["kind"] == "incremental (mark-on-allocate)"
    assert image_of(vol, r["snapshot"]) == dest_image(dest)

    churn(vol, rng)
    real_save, calls = update_module.state.save, []

    def save_then_die(v: PropertyStore, st: MirrorState) -> None:
        calls.append(st.pending)
        if st.pending is None:                    # the record after the far side committed
            raise VolumeError("killed here")
        real_save(v, st)
    monkeypatch.setattr(update_module.state, "save", save_then_die)
    with pytest.raises(BlockxferError, match="killed here"):
        run_update(vol, UrlTarget(url))
    monkeypatch.setattr(update_module.state, "save", real_save)
    st = load(vol, vol.dev.path)
    assert st.pending is not None and st.snap == r["snapshot"]
    again = run_update(vol, UrlTarget(url))
    assert again["kind"] == "already there" and again["snapshot"] == st.pending.top
    assert image_of(vol, again["snapshot"]) == dest_image(dest)
    churn(vol, rng)
    last = run_update(vol, UrlTarget(url))
    assert image_of(vol, last["snapshot"]) == dest_image(dest)
    vol.close()
