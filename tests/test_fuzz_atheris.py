"""The stream parser under atheris for a bounded run (skips when atheris is absent)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("atheris", reason="atheris not installed (pip install atheris)")


def test_parser_survives_coverage_guided_fuzzing(tmp_path: object) -> None:
    script = os.path.join(os.path.dirname(__file__), "fuzz_stream.py")
    r = subprocess.run([sys.executable, script, "-runs=20000", "-max_len=4096",
                        "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/"],
                       capture_output=True, text=True, timeout=240,
                       cwd=os.path.dirname(os.path.dirname(script)))
    assert r.returncode == 0, r.stderr[-2000:]
