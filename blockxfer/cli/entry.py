"""The `blockxfer` command's entry point (the console script and `python -m
blockxfer.cli`): what must happen before the command set is imported.

`blockxfer send ... ssh://...` starts ssh first, so the far side connects and
starts up while this side imports its commands (about a second on a busy
machine), as both ends of `zfs send | ssh host zfs receive` start at once.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def _early_ssh(argv: Sequence[str]) -> None:
    if not argv or argv[0] != "send" or {"-h", "--help", "-n", "--dry-run"} & set(argv):
        return
    url = next((a for a in argv[1:] if a.startswith("ssh://")), None)
    if url is not None:
        from blockxfer.transport.ssh import prestart
        prestart(url)


def run(argv: Sequence[str] | None = None) -> int:
    """`blockxfer ARGV...` (default: sys.argv[1:]); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    _early_ssh(args)
    from blockxfer.cli.app import main
    return main(args)
