"""`make bench`: every bench in one run, each printing ours and the peer side by side,
then one summary table of every ratio against its goal (see bench/summary.py), also
written to bench/results/latest.json with the previous run beside it.

Run one with `python -m bench.bench_volume` (stream, tape, reader, nbd), or a few
through the summary with `python -m bench bench_nbd bench_tape`. Root is needed to
drop caches, attach loop devices and mount btrfs; without it those rows say so and
the rest run. A bench reports each figure through `bench.common.row()`.
"""

import importlib
import sys
import traceback

from bench import common, summary

# one line per bench (module bench/NAME.py with a main())
BENCHES = [
    "bench_volume",
    "bench_stream",
    "bench_tape",
    "bench_reader",
    "bench_nbd",
    "bench_transport",
    "bench_objstore",
    "bench_mirror",
    "bench_replicate",
]


def main() -> int:
    names = sys.argv[1:] or BENCHES
    failed = []
    for name in names:
        print(f"\n== {name} ==", flush=True)
        sys.argv = [name]                 # each bench parses its own (empty) arguments
        common.current_bench = name.removeprefix("bench_")
        try:
            code = importlib.import_module(f"bench.{name}").main()
        except SystemExit as e:
            code = e.code
        except Exception:  # one bench failing must not hide the others' figures
            traceback.print_exc()
            code = 1
        if code:
            failed.append(name)
    print("\n== summary ==")
    print(summary.finish(common.ROWS, names, failed))
    if failed:
        print(f"failed: {', '.join(failed)}")
    print(f"saved in {summary.RESULTS}: latest.json (the run before: previous.json)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
