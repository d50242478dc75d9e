"""The `blockxfer` command's entry point (the console script and `python -m
blockxfer.cli`): what must happen before the command set is imported.

`blockxfer send ... ssh://...` and `blockxfer replicate pull ssh://...` start ssh
first, so the far side connects and starts up while this side imports its
commands (about a second on a busy machine), as both ends of `zfs send | ssh
host zfs receive` start at once. A pull into a served target is made by its
service, so it starts none.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

HELP = {"-h", "--help"}


def _early_url(argv: Sequence[str]) -> str | None:
    """The ssh:// URL of a command that will connect to it, if any."""
    if HELP & set(argv):
        return None
    if argv[:1] == ["send"] and not {"-n", "--dry-run"} & set(argv):
        return next((a for a in argv[1:] if a.startswith("ssh://")), None)
    if list(argv[:2]) == ["replicate", "pull"] and len(argv) > 3 \
            and argv[2].startswith("ssh://") and not argv[3].startswith("-"):
        from blockxfer.service.control import server_running
        return None if server_running(argv[3]) else argv[2]
    return None


def _early_ssh(argv: Sequence[str]) -> None:
    url = _early_url(argv)
    if url is not None:
        from blockxfer.transport.ssh import prestart
        prestart(url)


def run(argv: Sequence[str] | None = None) -> int:
    """`blockxfer ARGV...` (default: sys.argv[1:]); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    _early_ssh(args)
    from blockxfer.cli.app import main
    return main(args)
