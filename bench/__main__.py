"""`make bench`: every bench in one run, each printing ours and the peer side by side.

Run one with `python -m bench.bench_volume` (stream, tape, reader, nbd). Root is
needed to drop caches, attach loop devices and mount btrfs; without it those rows
say so and the rest run.
"""

import importlib
import sys
import traceback

BENCHES = ["bench_volume", "bench_stream", "bench_tape", "bench_reader", "bench_nbd",
           "bench_transport", "bench_objstore"]


def main() -> int:
    failed = 0
    for name in sys.argv[1:] or BENCHES:
        print(f"\n== {name} ==", flush=True)
        sys.argv = [name]                 # each bench parses its own (empty) arguments
        try:
            importlib.import_module(f"bench.{name}").main()
        except SystemExit as e:
            failed += bool(e.code)
        except Exception:  # one bench failing must not hide the others' figures
            traceback.print_exc()
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
