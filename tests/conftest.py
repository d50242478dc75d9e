"""Shared fixtures: temporary volumes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.volume import Volume


def pytest_configure(config: pytest.Config) -> None:
    """pytest-xdist's workers start with SIGINT ignored, and a child inherits an
    ignored signal through exec: the interrupt tests' `blockxfer` then ran on to
    exit 0. Give the workers, and so their children, Python's own handler."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every dump, send -o and upload notes its image in the catalog: the tests' go to
    a temporary one, never /var/lib/blockxfer (children inherit the variable)."""
    old = os.environ.get("BLOCKXFER_CATALOG")
    os.environ["BLOCKXFER_CATALOG"] = str(tmp_path_factory.mktemp("catalog") / "catalog.db")
    yield
    if old is None:
        os.environ.pop("BLOCKXFER_CATALOG", None)
    else:
        os.environ["BLOCKXFER_CATALOG"] = old


@pytest.fixture
def volume_path(tmp_path: object) -> str:
    return os.path.join(str(tmp_path), "vol.img")


@pytest.fixture
def volume(volume_path: str) -> Iterator[Volume]:
    dev = open_device(volume_path, write=True, create_size=32 << 20)
    vol = Volume.create(dev, virtual_size=8 << 20)
    yield vol
    if vol.dev.fd >= 0:  # type: ignore[attr-defined]
        vol.close()


def reopen(vol: Volume) -> Volume:
    path = vol.dev.path
    vol.close()
    return Volume.open(open_device(path, write=True))


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices)")


@pytest.fixture
def root() -> None:
    need_root()
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("needs /dev/loop-control")


@pytest.fixture(scope="session")
def chain4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The streams of a small volume's s1 (full) and s2..s4 (each an increment on the
    one before), for the object-store tests."""
    from tests.objstore_helpers import make_chain, stream_of
    vol = make_chain(str(tmp_path_factory.mktemp("chain4") / "src.img"), 4)
    streams = {"s1": stream_of(vol, "s1")}
    streams |= {f"s{i}": stream_of(vol, f"s{i} - s{i - 1}") for i in range(2, 5)}
    vol.close()
    return streams
