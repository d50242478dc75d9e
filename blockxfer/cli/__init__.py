"""The `blockxfer` command line: one module per command group (see app.GROUPS)."""

from blockxfer.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
