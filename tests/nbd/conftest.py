from __future__ import annotations

from collections.abc import Iterator

import pytest

from blockxfer.nbd.server import Server
from tests.nbd.fakes import FakeVolume


@pytest.fixture
def volume() -> FakeVolume:
    v = FakeVolume(8 << 20)
    v.write(1 << 20, b"snapdata" * 512)      # one mapped 4 KiB block at 1 MiB
    v.create_snapshot("s1")
    return v


@pytest.fixture
def server(volume: FakeVolume) -> Iterator[Server]:
    s = Server(volume)
    yield s
    s.shutdown(timeout=5)


@pytest.fixture(autouse=True)
def run_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> str:
    d = str(tmp_path_factory.mktemp("run"))
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", d)
    return d
