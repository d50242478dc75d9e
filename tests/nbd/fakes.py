"""An in-memory stand-in for `blockxfer.volume.Volume`, with exactly its surface.

Blocks are mapped or not; unmapped blocks read as zeros; TRIM unmaps whole
blocks and zeroes the partial ones at either end; snapshots are frozen copies.
`commit()` counts consistency points so tests can see FLUSH, FUA and the final
commit. It raises the volume's own errors (NotFound, AlreadyExists), and
`fail_next` injects an error into the next call, so the server's error table
runs in the tests.
"""

from __future__ import annotations

from blockxfer.errors import AlreadyExists, BlockxferError, NotFound


class FakeVolume:
    def __init__(self, virtual_size: int = 64 << 20, block_size: int = 4096) -> None:
        assert virtual_size % block_size == 0
        self.block_size = block_size
        self.virtual_size = virtual_size
        self._data = bytearray(virtual_size)
        self._mapped = bytearray(virtual_size // block_size)   # 1 = mapped
        self._snaps: dict[str, tuple[bytes, bytes]] = {}
        self.commits = 0
        self.syncs = 0
        self.closed = False
        self.fail_next: BlockxferError | None = None

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            e, self.fail_next = self.fail_next, None
            raise e

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError(f"{offset}+{length} outside the volume")

    def _state(self, snapshot: str | None) -> tuple[bytes | bytearray, bytes | bytearray]:
        if snapshot is None:
            return self._data, self._mapped
        if snapshot not in self._snaps:
            raise NotFound(f"no snapshot {snapshot!r}")
        return self._snaps[snapshot]

    def read(self, offset: int, length: int, snapshot: str | None = None) -> bytes:
        self._maybe_fail()
        self._check(offset, length)
        data, _ = self._state(snapshot)
        return bytes(data[offset:offset + length])

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._maybe_fail()
        self._check(offset, len(data))
        self._data[offset:offset + len(data)] = data
        bs = self.block_size
        for b in range(offset // bs, (offset + len(data) + bs - 1) // bs):
            self._mapped[b] = 1

    def trim(self, offset: int, length: int) -> None:
        self._maybe_fail()
        self._check(offset, length)
        bs = self.block_size
        self._data[offset:offset + length] = bytes(length)
        first, last = -(-offset // bs), (offset + length) // bs
        for b in range(first, last):
            self._mapped[b] = 0

    def write_zeroes(self, offset: int, length: int) -> None:
        self.trim(offset, length)

    def extents(self, offset: int, length: int,
                snapshot: str | None = None) -> list[tuple[int, int, bool]]:
        self._maybe_fail()
        self._check(offset, length)
        _, mapped = self._state(snapshot)
        bs = self.block_size
        out: list[tuple[int, int, bool]] = []
        end = offset + length
        pos = offset
        while pos < end:
            m = bool(mapped[pos // bs])
            nxt = min((pos // bs + 1) * bs, end)
            if out and out[-1][2] == m:
                out[-1] = (out[-1][0], out[-1][1] + nxt - pos, m)
            else:
                out.append((pos, nxt - pos, m))
            pos = nxt
        return out

    def commit(self) -> None:
        self._maybe_fail()
        self.commits += 1

    def sync(self) -> None:
        """A FLUSH or FUA: durable through the intent log, not a CP."""
        self._maybe_fail()
        self.syncs += 1

    def snapshot_names(self) -> list[str]:
        return sorted(self._snaps)

    def create_snapshot(self, name: str, *, shadow: bool = False, master: bool = False) -> None:
        self._maybe_fail()
        if name in self._snaps:
            raise AlreadyExists(f"snapshot {name!r} exists")
        self.commit()
        self._snaps[name] = (bytes(self._data), bytes(self._mapped))

    def close(self) -> None:
        self.commit()
        self.closed = True

    def __enter__(self) -> FakeVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
