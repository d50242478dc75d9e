"""The `blockxfer` command line: one module per command group (see app.GROUPS).

`main` and `build_parser` are app's, imported when first asked for: importing
this package alone (as the entry point, blockxfer.cli.entry, does) must not
import every command.
"""

from typing import Any

__all__ = ["build_parser", "main"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from blockxfer.cli import app
        return getattr(app, name)
    raise AttributeError(f"module 'blockxfer.cli' has no attribute {name!r}")
