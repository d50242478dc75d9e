"""NBD export vs qemu-nbd, same client, same disk: `python -m bench.bench_nbd`.

Sequential write (`nbdcopy --flush`: durable on both) and read of SIZE bytes
with `nbdcopy` (random data, so its zero detection skips nothing), the page
cache dropped before each run, alternating between the servers for a few
rounds (median kept), then as many rounds of 4 KiB random writes at queue
depth 32, of 4 KiB writes each followed by a FLUSH (for a few seconds, and
exactly 1000 of them, timed), with fio's nbd engine
(nbdcopy cannot issue random writes; fio is the same client for both servers).
qemu-nbd serves a raw file next to ours. Our server runs in this process over
a backend (a factory `(path, size) -> context manager of a Volume`): the real
`Volume` on a file by default, or `--backend file`, a raw-file stand-in that
isolates the protocol handling.
Needs: qemu-utils (qemu-nbd), libnbd-bin (nbdcopy), fio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from bench.backends import BACKENDS
from bench.common import drop_caches, row, stop
from blockxfer.nbd import readpipe
from blockxfer.nbd.server import Server
from blockxfer.volume import blockio

MiB = 1 << 20
Backend = Callable[[str, int], AbstractContextManager[Any]]


@contextlib.contextmanager
def our_server(backend: Backend, path: str, size: int, sock: str) -> Iterator[str]:
    with backend(path, size) as vol:
        server = Server(vol)
        server.listen(f"unix:{sock}")
        t = threading.Thread(target=server.serve_forever, daemon=True)
        t.start()
        try:
            yield f"nbd+unix:///?socket={sock}"
        finally:
            server.stop()
            t.join(60)


@contextlib.contextmanager
def qemu_nbd(path: str, size: int, sock: str) -> Iterator[str]:
    with open(path, "wb") as f:
        f.truncate(size)
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", sock, "-x", "", "-e", "8", "-t",
                             "--cache=writeback", "--aio=threads", "--discard=unmap", path])
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        stop(proc)


def timed(argv: list[str]) -> float:
    drop_caches()            # both servers start from the disk, not the page cache
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def fio_job(uri: str, size: int, *extra: str) -> dict[str, Any]:
    """fio's JSON result of 4 KiB random writes (queue depth 32 unless `extra` says
    otherwise)."""
    out = subprocess.run(["fio", "--name=rw", "--ioengine=nbd", f"--uri={uri}",
                          "--rw=randwrite", "--bs=4k", "--iodepth=32", f"--size={size}",
                          "--output-format=json", *extra],
                         check=True, capture_output=True, text=True).stdout
    job: dict[str, Any] = json.loads(out[out.index("{"):])["jobs"][0]
    return job


def fio_randwrite(uri: str, size: int, seconds: int, *extra: str) -> float:
    """IOPS of 4 KiB random writes for `seconds`."""
    job = fio_job(uri, size, f"--runtime={seconds}", "--time_based", *extra)
    return float(job["write"]["iops"])


def fio_write_flush(uri: str, size: int, seconds: int) -> float:
    """4 KiB random writes per second, each followed by a FLUSH, one at a time (a
    guest's synchronous writes: a FLUSH is an intent log record, not a CP)."""
    return fio_randwrite(uri, size, seconds, "--iodepth=1", "--fsync=1")


def fio_write_flush_x1000(uri: str, size: int, runs: int = 5) -> float:
    """Seconds for exactly 1000 4 KiB random writes, each followed by a FLUSH: the
    median of `runs` runs (one run is under half a second, so one stall of the
    shared disk moved a round's figure by 20 %)."""
    times = []
    for _ in range(runs):
        job = fio_job(uri, size, "--iodepth=1", "--fsync=1", f"--io_size={1000 * 4}k")
        assert job["write"]["total_ios"] == 1000, job["write"]["total_ios"]
        times.append(float(job["job_runtime"]) / 1000)
    return statistics.median(times)


def sequential(uri: str, src: str, size: int) -> dict[str, float]:
    return {"seq_write_MiBps": size / MiB / timed(["nbdcopy", "--flush", src, uri]),
            "seq_read_MiBps": size / MiB / timed(["nbdcopy", uri, "null:"])}


def reads_only(uri: str, src: str, size: int, first: list[str]) -> dict[str, float]:
    """`--reads-only`: the first call writes SIZE twice (the rewrite lands copy-on-write,
    in shorter runs, as in the full bench's later rounds); every call then reads."""
    if uri not in first:
        first.append(uri)
        for _ in range(2):
            subprocess.run(["nbdcopy", "--flush", src, uri], check=True)
    return {"seq_read_MiBps": size / MiB / timed(["nbdcopy", uri, "null:"])}


def run(backend: Backend, size: int, workdir: str, seconds: int,
        rounds: int = 3, only_reads: bool = False) -> dict[str, dict[str, float]]:
    """Both servers up at once; every metric alternates between them for `rounds`
    rounds and the median is kept (a shared virtual disk is noisy). The sequential
    rounds all come first: the volume writes copy-on-write, so after random 4 KiB
    writes a sequential rewrite lands in scattered free blocks and reads slower."""
    for tool, pkg in (("nbdcopy", "libnbd-bin"), ("qemu-nbd", "qemu-utils")):
        if not shutil.which(tool):
            raise SystemExit(f"bench needs {tool} (apt-get install {pkg})")
    with tempfile.TemporaryDirectory(dir=workdir) as d, contextlib.ExitStack() as stack:
        src = os.path.join(d, "src.raw")
        with open(src, "wb") as f:
            for _ in range(size // (64 * MiB) or 1):
                f.write(os.urandom(min(size, 64 * MiB)))
        uris = {
            "qemu-nbd": stack.enter_context(qemu_nbd(os.path.join(d, "qemu.raw"), size,
                                                     os.path.join(d, "q.sock"))),
            "blockxfer": stack.enter_context(our_server(backend, os.path.join(d, "ours.raw"),
                                                        size, os.path.join(d, "o.sock"))),
        }
        samples: dict[str, dict[str, list[float]]] = {k: {} for k in uris}
        phases: list[Callable[[str], dict[str, float]]] = [
            lambda uri: sequential(uri, src, size)]
        if only_reads:
            written: list[str] = []
            phases = [lambda uri: reads_only(uri, src, size, written)]
        elif shutil.which("fio"):      # after every sequential round: random writes scatter
            phases.append(lambda uri: small_writes(uri, size, seconds))  # a volume's blocks
        for phase in phases:
            for _ in range(rounds):
                for name, uri in uris.items():
                    for metric, value in phase(uri).items():
                        samples[name].setdefault(metric, []).append(value)
        return {name: {m: statistics.median(v) for m, v in ms.items()}
                for name, ms in samples.items()}


def small_writes(uri: str, size: int, seconds: int) -> dict[str, float]:
    return {"randwrite_4k_iops": fio_randwrite(uri, size, seconds),
            "write_flush_4k_per_s": fio_write_flush(uri, size, seconds),
            "write_flush_4k_x1000_s": fio_write_flush_x1000(uri, size)}


# metric -> (row name, unit, goal of ours/qemu-nbd; issue 17)
ROWS = {
    "seq_write_MiBps": ("nbd seq write (nbdcopy --flush)", "MiB/s", 0.95),
    "seq_read_MiBps": ("nbd seq read (nbdcopy)", "MiB/s", 0.95),
    "randwrite_4k_iops": ("nbd 4k randwrite qd32 (fio)", "IOPS", 0.8),
    "write_flush_4k_per_s": ("nbd 4k write+flush qd1 (fio)", "IOPS", 0.8),
    "write_flush_4k_x1000_s": ("nbd 4k write+flush x1000 (fio)", "s", 0.8),
}
LOWER_IS_BETTER = {"write_flush_4k_x1000_s"}


def report(results: dict[str, dict[str, float]], label: str = "") -> None:
    """One row per metric, blockxfer vs qemu-nbd (recorded for `make bench`)."""
    ours, theirs = results["blockxfer"], results["qemu-nbd"]
    for k in theirs:
        name, unit, goal = ROWS[k]
        print(row(f"{name}{label}", ours[k], theirs[k], goal=goal, unit=unit,
                  better="lower" if k in LOWER_IS_BETTER else "higher"))


def main(argv: list[str] | None = None, backend: Backend | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_nbd", description=__doc__)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default=os.environ.get("TMPDIR", "/var/tmp"),
                    help="where the raw files go (same disk for both servers)")
    ap.add_argument("--seconds", type=int, default=5, help="run time of each fio run")
    ap.add_argument("--rounds", type=int, default=3, help="runs per server and metric (median)")
    ap.add_argument("--backend", choices=sorted(BACKENDS), default="volume",
                    help="what our server exports (default: the real volume on a file)")
    ap.add_argument("--reads-only", action="store_true",
                    help="write once and rewrite, then only time sequential reads")
    ap.add_argument("--read-depth", type=int, default=readpipe.DEPTH,
                    help="device requests of READs in flight per connection (our server)")
    ap.add_argument("--io-in-flight", type=int, default=blockio.READ_IN_FLIGHT,
                    help="the volume's block read threads (device reads in flight)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    readpipe.DEPTH, blockio.READ_IN_FLIGHT = a.read_depth, a.io_in_flight   # in-process
    results = run(backend or BACKENDS[a.backend], a.size_mib * MiB, a.dir, a.seconds, a.rounds,
                  a.reads_only)
    if a.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        report(results, "" if a.backend == "volume" else f" [{a.backend}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
