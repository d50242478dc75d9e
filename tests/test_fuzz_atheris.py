"""The stream parser under atheris for a bounded run (skips when atheris is absent)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("atheris", reason="atheris not installed (pip install atheris)")


def test_parser_survives_coverage_guided_fuzzing(tmp_path: object) -> None:
    script = os.path.join(os.path.dirname(__file__), "fuzz_stream.py")
    fuzz = [sys.executable, script, "-runs=20000", "-max_len=4096", "-rss_limit_mb=1024",
            f"-artifact_prefix={tmp_path}/"]
    # Through a shell that forks it: libFuzzer's RSS is the kernel's peak RSS, which an
    # exec keeps from the process it replaces, so run straight from this pytest worker
    # it started at the worker's own peak (1330 MB after other tests: "out-of-memory"
    # before its first input). A forked child starts its peak afresh.
    r = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *fuzz],
                       capture_output=True, text=True, timeout=240,
                       cwd=os.path.dirname(os.path.dirname(script)))
    assert r.returncode == 0, r.stderr[-2000:]
