"""Coverage-guided fuzzing of the stream parser with atheris (libFuzzer).

Run by tests/test_fuzz_atheris.py for a bounded number of runs; by hand:
    .venv/bin/python tests/fuzz_stream.py -runs=100000
Any exception other than StreamError is a crash.
"""

import io
import sys

import atheris

with atheris.instrument_imports():
    from blockxfer.errors import StreamError
    from blockxfer.stream.decode import StreamReader


def one(data: bytes) -> None:
    reader = StreamReader(io.BytesIO(data), "fuzz")
    try:
        reader.read_header()
        for _ in reader:
            pass
    except StreamError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
