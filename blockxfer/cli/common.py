"""Small helpers every command group shares: metavars, addresses, progress."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from blockxfer.errors import UsageError
from blockxfer.units import human, parse_size

from .spec import Arg, Report, arg

if TYPE_CHECKING:
    from blockxfer.progress import Mode, Progress

# The command modules import what a command needs inside its handler, not at the
# top: every `blockxfer` process builds the whole parser, and the far end of each
# ssh:// transfer is one more process (tests/test_cli_startup.py holds this).

# One addressing model (blockxfer help topics): the metavars say it everywhere.
VOLUME = "VOLUME"                 # a volume's block device or file
AT_SNAPSHOT = "VOLUME@SNAPSHOT"   # one snapshot of a volume
EXPR = "EXPR"                     # an image expression: 'june5 - june3'
TAPE = "TAPE"                     # /dev/nstN or a virtual tape file


# shtab completers (blockxfer/cli/docgen.py defines the bash function)
SNAPSHOT_COMPLETION = {"bash": "_blockxfer_snapshots", "zsh": "_files"}


def snapshot_arg(help: str, metavar: str = AT_SNAPSHOT) -> Arg:
    """VOLUME@SNAPSHOT: the volume completes as a file, then the snapshot names."""
    return arg("target", metavar=metavar, help=help, complete=SNAPSHOT_COMPLETION)


def volume_arg(help: str = "the volume's block device or file") -> Arg:
    return arg("path", metavar=VOLUME, help=help)


def expr_arg() -> Arg:
    return arg("expression", metavar=EXPR,
               help="the image: a snapshot name, 'top - base', or 'a + b - c' "
                    "(quote it; see 'blockxfer help expressions')")


def need_snapshot(target: str) -> tuple[str, str]:
    from blockxfer.handles import split_target
    path, snap = split_target(target)
    if snap is None:
        raise UsageError(f"{target!r}: name the snapshot as VOLUME@SNAPSHOT")
    return path, snap


def size_arg(text: str) -> int:
    """An argparse `type` for sizes such as 256K or 10G."""
    try:
        return parse_size(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def progress(a: argparse.Namespace, what: str, total: int | None = None) -> Progress:
    """A progress display as the options ask: none (-q), parsable lines (-P),
    else a bar on a terminal and a line every few seconds elsewhere."""
    from blockxfer.progress import Progress
    mode: Mode = ("quiet" if a.quiet else "parsable" if getattr(a, "parsable", False)
                  else "auto")
    return Progress(what, total, mode=mode)


def image_bytes(path: str, expression: str) -> int | None:
    """The image's data size, for a progress total (an ETA); None when it cannot
    be had cheaply here: the command itself then reports what is wrong."""
    from blockxfer.errors import BlockxferError
    from blockxfer.service.session import open_session
    try:
        with open_session(path) as s:
            info = s.image(expression)
        return int(str(info["bytes"]))
    except BlockxferError:
        return None


def parsable_arg() -> Arg:
    return arg("-P", "--parsable", action="store_true",
               help="progress as tab-separated lines on standard error: "
                    "'progress WHAT SECONDS BYTES TOTAL' each second, then 'done ...' "
                    "(docs/cli-json.md)")


def result_of(obj: Any) -> dict[str, Any]:
    """A library result dataclass as JSON-ready data."""
    from dataclasses import asdict, is_dataclass
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: (list(v) if isinstance(v, tuple | set | frozenset) else v)
                for k, v in asdict(obj).items()}
    return dict(obj)


def dry_run_arg(what: str) -> Arg:
    return arg("-n", "--dry-run", action="store_true",
               help=f"{what}; change nothing (like zfs send -nv)")


def measure_report(a: argparse.Namespace, verb: str, where: str) -> Report:
    """`send -n` and `dump -n`: the image's exact size from the planes and an
    estimate after compression, reading a sample of its blocks."""
    from blockxfer.service.session import LocalSession, open_session, parallel_reader
    from blockxfer.transfer.measure import measure
    with open_session(a.path) as s:
        if isinstance(s, LocalSession):
            data: dict[str, Any] = measure(s.vol, a.expression, parallel_reader(s.vol, None),
                                           compress=a.compress).as_dict()
        else:                           # the server owns the volume: exact size only
            data = {**s.image(a.expression), "estimated_bytes": None, "sampled_blocks": 0}
    data.update(dry_run=True, volume=a.path, destination=where)
    line = (f"would {verb} {a.expression!r} of {a.path} to {where}: {data['blocks']} blocks, "
            f"{human(data['bytes'])} ({data['bytes']} bytes) of data")
    if data["estimated_bytes"] is not None and a.compress:
        line += (f", about {human(data['estimated_bytes'])} after compression (estimated "
                 f"from {data['sampled_blocks']} blocks)")
    return Report(data, [line])


def syslog_arg() -> Arg:
    """For the services: log to syslog (journald reads /dev/log) besides stderr."""
    return arg("--syslog", nargs="?", const="/dev/log", metavar="SOCKET",
               help="also log to syslog / journald through SOCKET (default /dev/log)")
