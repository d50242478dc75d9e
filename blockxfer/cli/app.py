"""The `blockxfer` command: the parser assembled from the command groups, and
`main`, the single place where errors become one line and an exit code.

Errors raised on purpose (BlockxferError) become one line on stderr and the
error's exit code (docs/exit-codes.md); anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
from collections.abc import Sequence
from contextlib import redirect_stdout
from typing import Any, TextIO

from blockxfer import __version__
from blockxfer.errors import BlockxferError, UsageError
from blockxfer.transport.local import stdout_errors

from . import (
    catalog,
    demo,
    devices,
    docgen,
    endpoint,
    increments,
    mirror,
    policy,
    replicate,
    serve,
    store,
    stream,
    tape,
    topics,
    units,
    volume,
)
from .spec import FORMATTER, Command, Report, add_commands

# The command groups, in the order --help lists them. A new group is one module
# with a COMMANDS tuple and one entry here.
GROUPS: tuple[tuple[Command, ...], ...] = (
    volume.COMMANDS, stream.COMMANDS, tape.COMMANDS, serve.COMMANDS, devices.COMMANDS,
    mirror.COMMANDS, increments.COMMANDS, replicate.COMMANDS, store.COMMANDS,
    catalog.COMMANDS, endpoint.COMMANDS, policy.COMMANDS, units.COMMANDS, topics.COMMANDS,
    docgen.COMMANDS, demo.COMMANDS,
)

DESCRIPTION = """\
Block-level snapshot transfer: a copy-on-write volume with snapshots as bit
planes, image streams to a file, a host or tape, and an NBD export.

Addressing, the same in every command:
  VOLUME            a volume: its block device or file (/dev/md0, /srv/vol.img)
  VOLUME@SNAPSHOT   one snapshot of it (read, snapshot, destroy)
  VOLUME 'EXPR'     an image of it: 'june3' (full), 'june3 - june1' (an increment),
                    'june5 + june4 - june3' (quote it; 'june3-june1' is ONE name)
  DESTINATION, SOURCE  a path, - (standard input/output), ssh://[user@]host/PATH
                    or tls://host:port/PATH (a volume on that host)
  TAPE              /dev/nstN or a virtual tape file

Every command takes --json (its result as one JSON object), -q, -v and --log-level.
Run blockxfer COMMAND --help for examples, blockxfer help for the concepts.
"""

EXAMPLES = """\
examples:
  blockxfer init /srv/vol.img --size 10G
  blockxfer snapshot /srv/vol.img@june1
  blockxfer send /srv/vol.img 'june3 - june1' ssh://backup/srv/copy.img
  blockxfer dump /srv/vol.img june1 --tape /dev/nst0 --verify
  blockxfer help expressions
"""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `command`, one holding only the group that has that
    command (what its parse needs: building all of them is a tenth of a second
    of every start-up on a busy machine, and of the far side of every ssh://)."""
    p = argparse.ArgumentParser(prog="blockxfer", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=FORMATTER)
    p.add_argument("--version", action="version", version=f"blockxfer {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    mine = [g for g in GROUPS if any(c.name == command for c in g)]
    for group in mine or GROUPS:
        add_commands(sub, group, "command")
    return p


def _print(report: Report, as_json: bool, quiet: bool) -> None:
    out = sys.stderr if report.stderr else sys.stdout
    if as_json:
        print(json.dumps(report.data, indent=2, sort_keys=True, default=str), file=out)
    elif not quiet:
        for line in report.text:
            print(line, file=out)


class _GuardedStdout:
    """sys.stdout whose write errors (a full disk, /dev/full) are one line naming
    standard output; the binary commands guard sys.stdout.buffer themselves."""

    def __init__(self, text: TextIO) -> None:
        self._text = text

    def write(self, s: str) -> int:
        with stdout_errors():
            return self._text.write(s)

    def flush(self) -> None:
        with stdout_errors():
            self._text.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._text, name)


def _drop_stdout() -> None:
    """Point standard output at /dev/null so the interpreter's last flush of what
    is still buffered does not report the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _logging(args: argparse.Namespace) -> None:
    level = getattr(logging, args.log_level.upper())
    level = min(level, {0: level, 1: logging.INFO}.get(args.verbose, logging.DEBUG))
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"blockxfer {args.command_name}: %(message)s")
    if getattr(args, "syslog", None):      # the services: syslog, which journald reads too
        from logging.handlers import SysLogHandler
        try:                        # the handler would only retry on each message
            is_socket = stat.S_ISSOCK(os.stat(args.syslog).st_mode)
        except OSError:
            is_socket = False
        if not is_socket:
            raise UsageError(f"--syslog {args.syslog}: no syslog socket there (is syslog or "
                             "journald running?); give its socket or leave --syslog out")
        handler = SysLogHandler(address=args.syslog, facility=SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(
            f"blockxfer[{os.getpid()}]: {args.command_name}: %(message)s"))
        logging.getLogger().addHandler(handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        _logging(args)
        with redirect_stdout(_GuardedStdout(sys.stdout)):
            report = args.func(args)
            _print(report, args.json, args.quiet)
            sys.stdout.flush()
        return report.code
    except BlockxferError as e:
        print(f"blockxfer: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:        # the reader went away (| head): quiet, as cat is
        _drop_stdout()
        return 141
    except OSError as e:           # the system refused where no check foresaw it
        logging.getLogger("blockxfer").debug("unexpected system error", exc_info=True)
        where = f": {e.filename}" if e.filename else ""
        print(f"blockxfer: {e.strerror or e}{where} (a system error blockxfer did not "
              "foresee; --log-level debug shows where)", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("blockxfer: interrupted", file=sys.stderr)
        return 130
