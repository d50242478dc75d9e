"""Start-up: every `blockxfer` process builds the whole parser (and `send ...
ssh://` and `replicate pull` pay for two processes), so building it must not import
what only some commands use: numpy and the volume, the stream codecs, tqdm, the
catalog's sqlite, ssl, boto3, the NBD server and the service (issues 11, 13).
"""

from __future__ import annotations

import json
import subprocess
import sys

from blockxfer.cli import serve
from blockxfer.nbd.tls import MODES

# Each is imported by the command that needs it, when it runs.
HEAVY = ("numpy", "boto3", "botocore", "tqdm", "sqlite3", "ssl", "psutil", "zstandard",
         "xxhash", "bitarray", "blockxfer.volume", "blockxfer.handles",
         "blockxfer.service.session", "blockxfer.service.service", "blockxfer.nbd.server",
         "blockxfer.stream.send", "blockxfer.catalog", "blockxfer.progress")

# what the entry point does before a command runs, and stdio-serve's module
PROBE = """
import json, sys
from blockxfer.cli.app import build_parser
for argv in (["info", "/srv/vol.img", "--json"], ["send", "/srv/vol.img", "s1", "-o", "f"],
             ["stdio-serve"], ["replicate", "pull", "ssh://a/v", "/srv/v"]):
    build_parser().parse_args(argv)
import blockxfer.service.endpoint
print(json.dumps(sorted(sys.modules)))
"""


def test_parsing_imports_no_heavy_module() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True,
                         text=True).stdout
    loaded = set(json.loads(out))
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert heavy == []


def test_serve_tls_modes_are_the_servers() -> None:
    assert serve.TLS_MODES == MODES
