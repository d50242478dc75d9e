"""One clear line for a bad resume token and for a header damaged past its checksum
(a sender that wrote nonsense): never zlib internals, never a snapshot named ''."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import StreamError, UsageError
from blockxfer.stream import format as fmt
from blockxfer.stream.decode import StreamReader
from blockxfer.stream.receive import receive_stream
from blockxfer.stream.send import send_image
from blockxfer.volume import Volume

MiB = 1 << 20


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    path = str(tmp_path_factory.mktemp("msg") / "src.img")
    vol = Volume.create(open_device(path, write=True, create_size=8 * MiB))
    vol.write(0, b"x" * 65536)
    vol.create_snapshot("a")
    vol.write(65536, b"y" * 65536)
    vol.create_snapshot("b")
    buf = io.BytesIO()
    send_image(vol, "b - a", buf)
    vol.close()
    return path, buf.getvalue()


def _with_header(stream: bytes, h: fmt.Header) -> bytes:
    """The stream with its HEADER record re-packed (checksum valid, digest not)."""
    r = StreamReader(io.BytesIO(stream))
    r.read_header()
    return b"".join(bytes(p) for p in fmt.record(fmt.HEADER, 0, h.pack())) + stream[r.offset:]


def _header(stream: bytes) -> fmt.Header:
    return StreamReader(io.BytesIO(stream)).read_header()


@pytest.mark.parametrize("damage", ["top name", "base name", "base guid", "listed name"])
def test_damaged_header_names_no_empty_snapshot(small: tuple[str, bytes], tmp_path: Path,
                                                damage: str) -> None:
    _, stream = small
    h = _header(stream)
    assert h.base is not None
    if damage == "top name":
        h.top = replace(h.top, name="")
    elif damage == "base name":
        h.base = replace(h.base, name="")
    elif damage == "base guid":
        h.base = replace(h.base, guid=bytes(16))
    else:
        h.snapshot_set = [replace(h.snapshot_set[0], name="")]
    with pytest.raises(StreamError) as e:
        receive_stream(io.BytesIO(_with_header(stream, h)), str(tmp_path / "t.img"), open_device)
    assert "''" not in str(e.value) and "header is damaged" in str(e.value)


def test_garbage_resume_token_is_one_line(small: tuple[str, bytes], tmp_path: Path) -> None:
    path, _ = small
    from blockxfer.stream.send import plan_send
    with Volume.open(open_device(path), writable=False) as vol:
        for token in ["garbage", "eNoT4ar5", "!!!", "A" * 200]:
            with pytest.raises(UsageError, match="not a resume token") as e:
                plan_send(vol, "b - a", resume=token)
            assert "zlib" not in str(e.value) and "Error -" not in str(e.value)
    p = subprocess.run([sys.executable, "-m", "blockxfer.cli", "send", path, "b - a",
                        "--resume", "garbage", "-o", str(tmp_path / "s.bin")],
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "not a resume token" in p.stderr


def test_a_cut_full_stream_into_a_new_file_says_the_file_is_new(tmp_path: Path) -> None:
    """A full receive cut off after blocks were placed keeps the new file for a resume,
    and says the file did not exist (not that old contents were overwritten)."""
    src = str(tmp_path / "src.img")
    with Volume.create(open_device(src, write=True, create_size=16 * MiB)) as vol:
        vol.write(0, bytes(range(256)) * 16384)
        vol.create_snapshot("a")
        buf = io.BytesIO()
        send_image(vol, "a", buf)
    cut = buf.getvalue()[:len(buf.getvalue()) * 2 // 3]
    with pytest.raises(StreamError) as e:
        receive_stream(io.BytesIO(cut), str(tmp_path / "new.img"), open_device)
    assert "holds an interrupted receive" in str(e.value), e.value
    assert "did not exist before" in str(e.value) and "overwritten" not in str(e.value)
