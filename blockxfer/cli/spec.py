"""The command line as data: each command group module lists `Command`s, and
`build` turns them into argparse parsers through argparse's public API only.

A command's handler parses nothing itself: it gets the parsed namespace, calls
one library function and returns a `Report` (the result as data for --json,
and lines for people); `blockxfer.cli.app.main` prints it.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Report:
    """What a command did: `data` is printed by --json, `text` otherwise."""
    data: dict[str, Any]
    text: list[str] = field(default_factory=list)
    code: int = 0
    stderr: bool = False        # standard output carries the command's data (send, read)


Handler = Callable[[argparse.Namespace], Report]


@dataclass(frozen=True)
class Arg:
    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    """An argument as argparse's add_argument takes it; help text is required."""
    if "help" not in options:
        raise TypeError(f"{flags[0]}: every argument needs help text")
    return Arg(flags, options)


@dataclass(frozen=True)
class OneOf:
    """Arguments of which at most one may be given."""
    args: tuple[Arg, ...]


@dataclass(frozen=True)
class Section:
    """Arguments shown under their own heading in --help."""
    title: str
    description: str
    args: tuple[Arg, ...]


Item = Arg | OneOf | Section


@dataclass(frozen=True)
class Command:
    name: str
    help: str                              # one line in the parent's command list
    description: str                       # the first paragraph of --help
    examples: tuple[str, ...]              # shell lines, each with a '# what it does' comment
    run: Handler | None = None
    args: tuple[Item, ...] = ()
    subcommands: tuple[Command, ...] = ()
    common: bool = True                    # takes --json and -q (stdout is not a protocol)
    log_level: str = "warning"             # --log-level's default


FORMATTER = argparse.RawDescriptionHelpFormatter


def paragraphs(text: str) -> str:
    """Wrap each paragraph (the raw formatter keeps the examples' lines as written)."""
    return "\n\n".join(textwrap.fill(p, 79) for p in text.split("\n\n"))


def epilog(examples: tuple[str, ...]) -> str:
    return "examples:\n" + textwrap.indent("\n".join(examples), "  ")


LOG_LEVELS = ("debug", "info", "warning", "error")


def add_common(p: argparse.ArgumentParser, c: Command) -> None:
    g = p.add_argument_group("output")
    if c.common:
        g.add_argument("--json", action="store_true",
                       help="print the result as one JSON object (keys: docs/cli-json.md)")
        g.add_argument("-q", "--quiet", action="store_true",
                       help="print nothing but errors (and --json); no progress")
    g.add_argument("--log-level", default=c.log_level, metavar="LEVEL", choices=LOG_LEVELS,
                   help=f"debug, info, warning or error: what the log on standard error "
                        f"shows (default {c.log_level})")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log: -v is --log-level info, -vv debug")


class _Container(Protocol):
    """A parser or one of its argument groups (argparse's group classes are private)."""
    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action: ...


def _add(p: _Container, a: Arg) -> None:
    options = dict(a.options)
    complete = options.pop("complete", None)
    action = p.add_argument(*a.flags, **options)
    if complete is not None:      # shtab's documented hook: {"bash": FUNCTION, "zsh": ...}
        action.complete = complete  # type: ignore[attr-defined]


def _add_items(p: argparse.ArgumentParser, items: tuple[Item, ...]) -> None:
    for item in items:
        if isinstance(item, Arg):
            _add(p, item)
        elif isinstance(item, OneOf):
            g = p.add_mutually_exclusive_group()
            for a in item.args:
                _add(g, a)
        else:
            s = p.add_argument_group(item.title, item.description)
            for a in item.args:
                _add(s, a)


def add_commands(sub: Any, commands: tuple[Command, ...], dest: str) -> None:
    """Add `commands` to the subparsers action `sub` (add_subparsers' result)."""
    for c in commands:
        p = sub.add_parser(c.name, help=c.help, description=paragraphs(c.description),
                           epilog=epilog(c.examples), formatter_class=FORMATTER)
        _add_items(p, c.args)
        if c.subcommands:
            inner = p.add_subparsers(dest=f"{dest}_{c.name}", required=True, metavar="COMMAND",
                                     title="commands")
            add_commands(inner, c.subcommands, f"{dest}_{c.name}")
            continue
        add_common(p, c)
        p.set_defaults(func=c.run, json=False, quiet=False, verbose=0, command_name=c.name)
