"""An S3 endpoint that is not a URL, from the option or the environment, is one line
with exit 2 (botocore raised a ValueError that surfaced as a traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BX = os.path.join(os.path.dirname(sys.executable), "blockxfer")


@pytest.mark.parametrize(("argv", "env"), [
    (["store", "verify", "s3://b/p", "--s3-endpoint", "notaurl"], {}),
    (["store", "ls", "s3://b/p"], {"AWS_ENDPOINT_URL": "notaurl"}),
])
def test_an_endpoint_that_is_not_a_url_is_one_line(argv: list[str],
                                                   env: dict[str, str]) -> None:
    r = subprocess.run([BX, *argv], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "AWS_ACCESS_KEY_ID": "a",
                            "AWS_SECRET_ACCESS_KEY": "b", **env})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "http(s)://HOST" in r.stderr
