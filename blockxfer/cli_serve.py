"""`blockxfer serve PATH --listen unix:SOCKET|tcp:HOST:PORT [--read-only]`.

Parses, opens the volume through the function the main CLI hands in, starts
its CP timer (a CP every 10 s while writes are pending), serves it until
SIGTERM or SIGINT, and returns. The server commits once every connection has
answered what it read; the volume's context manager commits again on the way
out. The control socket answers the other commands (`blockxfer.remote`) and
freezes file systems with `blockxfer.drivers.freeze` (this module is wiring,
like `cli`, so it may hand a driver down).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from blockxfer import remote
from blockxfer.drivers.freeze import frozen
from blockxfer.nbd.server import Server, parse_listen

OpenVolume = Callable[[str], AbstractContextManager[Any]]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="export a volume and its snapshots over NBD",
        description="Export the live volume (export '' or 'active') and each snapshot "
                    "('@NAME', read-only) over NBD until SIGTERM.")
    p.add_argument("path", metavar="PATH", help="the volume's device or file")
    p.add_argument("--listen", action="append", required=True, type=_listen_spec,
                   metavar="unix:SOCKET|tcp:HOST:PORT",
                   help="where to accept NBD clients (may be given more than once)")
    p.add_argument("--read-only", action="store_true", help="export the live volume read-only")
    p.add_argument("--no-control", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(cmd_serve=cmd_serve)


def _listen_spec(text: str) -> str:
    try:
        parse_listen(text)
    except Exception as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def cmd_serve(args: argparse.Namespace, open_volume: OpenVolume) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="blockxfer serve: %(message)s")
    with open_volume(args.path) as volume:
        server = Server(volume, read_only=args.read_only)
        for spec in args.listen:
            server.listen(spec)
        if not args.no_control:
            remote.register(server.serve_control(args.path, freezer=frozen))
        if not args.read_only and hasattr(volume, "start_cp_timer"):
            volume.start_cp_timer()
        previous = {s: signal.signal(s, lambda *_: server.stop())
                    for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            logging.getLogger(__name__).info("serving %s on %s", args.path,
                                             ", ".join(args.listen))
            server.serve_forever()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    return 0
