"""The `blockxfer` command line: one module per command group (see app.GROUPS)."""

import sys


def _early_ssh(argv: list[str]) -> None:
    """`blockxfer send ... ssh://...`: connect before importing every command (about a
    second on a busy machine), so that the far side's start-up overlaps ours."""
    if len(argv) < 3 or argv[1] != "send" or {"-h", "--help", "-n", "--dry-run"} & set(argv):
        return
    url = next((a for a in argv[2:] if a.startswith("ssh://")), None)
    if url is not None:
        from blockxfer.transport.ssh import prestart
        prestart(url)


_early_ssh(sys.argv)

from blockxfer.cli.app import build_parser, main  # noqa: E402 - after the early connection

__all__ = ["build_parser", "main"]
