"""Coverage-guided fuzzing of the stream parser with atheris (libFuzzer).

Run by tests/test_fuzz_atheris.py for a bounded number of runs; by hand:
    .venv/bin/python tests/fuzz_stream.py -runs=100000
Any exception other than StreamError is a crash.
"""

import contextlib
import io
import sys

import atheris

with atheris.instrument_imports():
    from blockxfer.errors import StreamError
    from blockxfer.stream.inspect import inspect_stream


def one(data: bytes) -> None:
    with contextlib.suppress(StreamError):
        inspect_stream(io.BytesIO(data))


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
