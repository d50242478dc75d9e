"""Mirror bench (issue 12), interleaved rounds, medians:

- one mirror update after a 5 % change of a volume holding 1 GiB (snapshot, send
  from the mark-on-allocate buffers, receive, commit at the destination, all
  durable) vs `btrfs send -p | btrfs receive` of the same change on a loop-backed
  btrfs, then `sync` of the receiving file system (goal >= 2x);
- bytes sent per update against the bytes changed (goal <= 1.1).

Each round changes the same amount on both sides, then times ours and the peer,
caches dropped before each. Run as root: `python -m bench.bench_mirror` (the btrfs
rows need btrfs-progs).
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
from collections.abc import Callable

from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.loop import loop_device
from blockxfer.drivers.reader import read_runs
from blockxfer.transfer.mirror import MirrorState, run_update, save
from blockxfer.transfer.mirror.target import LocalTarget
from blockxfer.volume import Volume

from .common import SCRATCH, row, run, timed

GIB = 1 << 30
PIECE = 64 << 10
CHANGES = int(0.05 * GIB) // PIECE
ROUNDS = int(os.environ.get("BENCH_MIRROR_ROUNDS", "5"))


def _change(write: Callable[[int, bytes], None], rng: random.Random) -> None:
    for _ in range(CHANGES):
        write(rng.randrange(GIB // PIECE) * PIECE, os.urandom(PIECE))


class Ours:
    """A source volume kept open (so its buffers track changes) and its mirror."""

    def __init__(self, data: str) -> None:
        self.src, self.dst = f"{SCRATCH}/mirror-src.img", f"{SCRATCH}/mirror-dst.img"
        for p in (self.src, self.dst):
            if os.path.exists(p):
                os.unlink(p)
        self.vol = Volume.create(open_device(self.src, write=True, create_size=GIB + GIB // 2),
                                 virtual_size=GIB + GIB // 4)
        with open(data, "rb") as f:
            off = 0
            while chunk := f.read(8 << 20):
                self.vol.write(off, chunk)
                off += len(chunk)
        save(self.vol, MirrorState(dest=self.dst))
        self.target = LocalTarget(self.dst, open_device)
        self.update()                                         # the full image
        self.sent: list[int] = []

    def update(self) -> dict[str, object]:
        vol = self.vol
        r = run_update(vol, self.target,
                       reader=lambda runs: read_runs(vol.dev, runs, vol.block_size))
        return r

    def round(self, rng: random.Random) -> float:
        _change(self.vol.write, rng)
        self.vol.commit()
        got: dict[str, object] = {}
        took = timed(lambda: got.update(self.update()))
        assert str(got["kind"]).startswith("incremental (mark-on-allocate)"), got
        self.sent.append(int(str(got["bytes"])))
        print(f"  ours: {took:.2f} s ({got['seconds']} s inside the update)", flush=True)
        return took

    def close(self) -> None:
        self.vol.close()
        for p in (self.src, self.dst):
            os.unlink(p)


class Btrfs:
    """The same changes on a loop-backed btrfs, mirrored by send -p | receive."""

    def __init__(self, data: str) -> None:
        self.img, self.mnt = f"{SCRATCH}/mirror-btrfs.img", f"{SCRATCH}/mirror-mnt"
        with open(self.img, "wb") as f:
            f.truncate(5 * GIB)
        os.makedirs(self.mnt, exist_ok=True)
        self._loop = loop_device(self.img)
        dev = self._loop.__enter__()
        run("mkfs.btrfs", "-q", "-f", dev)
        run("mount", dev, self.mnt)
        run("btrfs", "subvolume", "create", f"{self.mnt}/vol")
        os.makedirs(f"{self.mnt}/recv")
        run("cp", data, f"{self.mnt}/vol/data")
        self.n = 0
        self._snap()
        self._pipe(None)

    def _snap(self) -> None:
        self.n += 1
        run("btrfs", "subvolume", "snapshot", "-r", f"{self.mnt}/vol", f"{self.mnt}/s{self.n}")

    def _pipe(self, parent: int | None) -> None:
        p = ["-p", f"{self.mnt}/s{parent}"] if parent else []
        send = subprocess.Popen(["btrfs", "send", "-q", *p, f"{self.mnt}/s{self.n}"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        subprocess.run(["btrfs", "receive", "-q", f"{self.mnt}/recv"], stdin=send.stdout,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert send.stdout is not None
        send.stdout.close()
        if send.wait():
            raise RuntimeError("btrfs send failed")
        run("sync", "-f", f"{self.mnt}/recv")

    def round(self, rng: random.Random) -> float:
        with open(f"{self.mnt}/vol/data", "r+b") as f:
            def write(off: int, data: bytes) -> None:
                f.seek(off)
                f.write(data)
            _change(write, rng)
        self._snap()
        parent = self.n - 1
        took = timed(lambda: self._pipe(parent))
        print(f"  btrfs: {took:.2f} s", flush=True)
        for where in (self.mnt, f"{self.mnt}/recv"):      # the mirror keeps one base too
            run("btrfs", "subvolume", "delete", f"{where}/s{parent}")
        return took

    def close(self) -> None:
        subprocess.run(["umount", self.mnt], check=False)
        self._loop.__exit__(None, None, None)
        os.unlink(self.img)


def main() -> None:
    os.makedirs(SCRATCH, exist_ok=True)
    data = f"{SCRATCH}/mirror-data.bin"
    with open(data, "wb") as f:
        block = os.urandom(64 << 20)
        for _ in range(16):
            f.write(block)
    print(f"# blockxfer mirror bench, scratch {SCRATCH}, {ROUNDS} rounds of a 5% change "
          f"({CHANGES} x 64 KiB)")
    ours = Ours(data)
    peer = Btrfs(data) if shutil.which("mkfs.btrfs") and os.geteuid() == 0 else None
    rng_ours, rng_peer = random.Random(11), random.Random(11)
    t_ours, t_peer = [], []
    try:
        for _ in range(ROUNDS):
            t_ours.append(ours.round(rng_ours))
            if peer is not None:
                t_peer.append(peer.round(rng_peer))
        changed = CHANGES * PIECE
        ours_s = statistics.median(t_ours)
        if peer is not None:
            print(row("mirror update 5% vs btrfs send -p|receive", ours_s,
                      statistics.median(t_peer), changed, 2.0))
        else:
            print(row("mirror update 5% (no btrfs: root and btrfs-progs)", ours_s, None,
                      changed))
        sent = statistics.median(ours.sent)
        print(row("mirror bytes sent per update / changed", sent / changed, goal=1.1,
                  unit="x", better="lower"))
        print(f"rounds: ours {[round(t, 3) for t in t_ours]} s, btrfs "
              f"{[round(t, 3) for t in t_peer]} s; sent {ours.sent} B for {changed} B changed")
    finally:
        ours.close()
        if peer is not None:
            peer.close()
        os.unlink(data)


if __name__ == "__main__":
    main()
