"""`blockxfer serve VOLUME --listen unix:SOCKET|tcp:HOST:PORT [--read-only] [--tls ...]`.

Parses, opens the volume, starts its CP timer (a CP every 10 s while writes are
pending), serves it until SIGTERM or SIGINT, and returns. The server commits
once every connection has answered what it read; the volume's context manager
commits again on the way out. The service (`blockxfer.service.service`) owns the
volume: its control socket answers every other command, and this module hands
it what needs the drivers (freezing file systems with `blockxfer.drivers.freeze`,
opening tapes, the parallel reader). The volume is opened for writing even with
`--read-only` (which makes the NBD export of the live volume read-only), so an
incremental can still be received into a served replica.

Everything the command line says is checked before the volume is opened: a
bad `--listen`, unreadable TLS files, or a listener reachable from the network
without `--tls require` (which needs `--insecure`, and then warns) refuse in
one line with exit 2 and touch nothing.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from blockxfer.errors import UsageError
from blockxfer.nbd.tlsmodes import MODES

from .common import syslog_arg, volume_arg
from .increments import wire
from .mirror_source import mirror_target
from .spec import Command, Report, Section, arg

if TYPE_CHECKING:
    from blockxfer.nbd.tls import Mode, TlsPolicy

TLS_MODES = MODES        # from tlsmodes, not tls: building the parser must not load ssl

log = logging.getLogger(__name__)

OpenVolume = Callable[[str], AbstractContextManager[Any]]


def tls_policy(args: argparse.Namespace) -> TlsPolicy:
    """--tls and its files -> the policy; a mistake is a UsageError."""
    from blockxfer.nbd.tls import TlsPolicy, server_context
    mode: Mode = args.tls or ("require" if args.tls_cert else "off")
    if mode == "off":
        given = [f"--{n.replace('_', '-')}" for n in ("tls_cert", "tls_key", "tls_ca")
                 if getattr(args, n)]
        if given:
            raise UsageError(f"{', '.join(given)} given with --tls off: "
                             "use --tls on or --tls require, or drop them")
        return TlsPolicy()
    if not args.tls_cert:
        raise UsageError(f"--tls {mode} needs --tls-cert (and --tls-key unless the "
                         "certificate file holds the key)")
    return TlsPolicy(mode, server_context(args.tls_cert, args.tls_key, args.tls_ca))


def check_exposure(listen: list[str], tls: TlsPolicy, insecure: bool) -> list[str]:
    """The listeners a network can reach without mandatory TLS. Refused unless
    `insecure`; with it, they are returned for a warning."""
    from blockxfer.nbd.server import is_loopback
    exposed = [spec for spec in listen if not tls.required and not is_loopback(spec)]
    if exposed and not insecure:
        raise UsageError(f"--listen {exposed[0]} is reachable from the network and TLS is "
                         f"not required: add --tls require --tls-cert CERT --tls-key KEY, "
                         "listen on 127.0.0.1 or a unix socket, or accept the risk with "
                         "--insecure")
    return exposed


def serve_volume(args: argparse.Namespace, open_volume: OpenVolume) -> int:
    """Check the options, then serve the volume `open_volume` opens until a signal."""
    from blockxfer.drivers.freeze import frozen
    from blockxfer.nbd.server import parse_listen
    from blockxfer.service.service import Service
    from blockxfer.service.session import parallel_reader
    if not logging.getLogger().handlers:          # called without main() (tests)
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="blockxfer serve: %(message)s")
    for spec in args.listen:
        parse_listen(spec)
    tls = tls_policy(args)
    for spec in check_exposure(args.listen, tls, args.insecure):
        log.warning("warning: %s accepts %s: anyone who can reach it can read%s the volume "
                    "(--insecure)", spec,
                    "plain-text clients" if tls.offered else "clients without TLS",
                    "" if args.read_only else " and write")
    from .tapedrive import tape_opener
    with open_volume(args.path) as volume:
        service = Service(volume, args.path, read_only=args.read_only, tls=tls,
                          freezer=frozen, open_tape=tape_opener(), reader_for=parallel_reader,
                          open_target=mirror_target, wire_increments=wire)
        for spec in args.listen:
            service.listen(spec)
        if not args.no_control:
            service.serve_control()
        previous = {s: signal.signal(s, lambda *_: service.stop())
                    for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("serving %s on %s (TLS %s)", args.path, ", ".join(args.listen),
                     tls.mode)
            service.run()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    return 0


def cmd_serve(a: argparse.Namespace) -> Report:
    from blockxfer.handles import open_volume
    code = serve_volume(a, lambda path: open_volume(path, write=True))
    return Report({"volume": a.path, "listen": a.listen, "stopped": True}, code=code)


COMMANDS = (
    Command("serve", "export a volume and its snapshots over NBD",
            "Own the volume until SIGTERM: export the live volume (export '' or 'active') "
            "and each snapshot ('@NAME', read-only) over NBD, commit CPs, run scheduled "
            "jobs. Every other command (read, write, check, dump, send, an incremental "
            "receive or restore, ...) works meanwhile through the server's control socket "
            "(docs/service.md).",
            ("blockxfer serve /srv/vol.img --listen unix:/run/vol.sock",
             "blockxfer serve /srv/vol.img --listen tcp:0.0.0.0:10809 --tls require "
             "--tls-cert srv.pem --tls-key srv.key --tls-ca ca.pem",
             "nbdfuse /mnt/june1 --unix /run/vol.sock -e @june1   # a snapshot as a file"),
            cmd_serve,
            (volume_arg(),
             arg("--listen", action="append", required=True,
                 metavar="unix:SOCKET|tcp:HOST:PORT",
                 help="where to accept NBD clients (may be given more than once); a TCP "
                      "address other than loopback needs --tls require or --insecure"),
             arg("--read-only", action="store_true",
                 help="export the live volume read-only (a replica: incremental receives "
                      "through the server still land, and show as new snapshots)"),
             Section("TLS", "NBD_OPT_STARTTLS with X.509 certificates (clients: nbds:// URIs, "
                            "qemu tls-creds-x509). TLS-PSK is not offered: Python 3.11's ssl "
                            "has no PSK API.",
                     (arg("--tls", choices=TLS_MODES,
                          help="off: plain only; on: clients may upgrade; require: clients "
                               "must upgrade before any option (default: require with "
                               "--tls-cert, else off)"),
                      arg("--tls-cert", metavar="PEM", help="the server's certificate (chain)"),
                      arg("--tls-key", metavar="PEM",
                          help="the certificate's private key (default: in --tls-cert)"),
                      arg("--tls-ca", metavar="PEM",
                          help="accept only clients with a certificate this CA signed"))),
             arg("--insecure", action="store_true",
                 help="allow a non-loopback TCP listener without --tls require: anyone who "
                      "can connect reads (and writes) the volume"),
             syslog_arg(),
             arg("--no-control", action="store_true", help=argparse.SUPPRESS)),
            log_level="info"),
)
