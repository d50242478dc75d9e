"""The man page (argparse-manpage) and shell completion (shtab), generated from
the same parser --help uses, so they never drift from the command line.

`blockxfer man` and `blockxfer completion bash|zsh` print them; `make extras`
writes them under share/ for packaging (setup.py installs what is there)."""

from __future__ import annotations

import argparse

from blockxfer import __version__

from .spec import Command, Report, arg

SHELLS = ("bash", "zsh")

# VOLUME@SNAPSHOT: a file name until '@', then the volume's snapshot names
# (from 'snapshots --json', whose rows carry one "name" line each).
BASH_PREAMBLE = r"""
_blockxfer_snapshots() {
  local cur="$1" vol
  if [[ "$cur" == *@* ]]; then
    vol="${cur%@*}"
    blockxfer snapshots "$vol" --json 2>/dev/null \
      | sed -n 's/^ *"name": "\(.*\)",\{0,1\}$/\1/p' \
      | while read -r name; do
          [[ "$vol@$name" == "$cur"* ]] && printf '%s\n' "$vol@$name"
        done
  else
    compgen -f -- "$cur"
  fi
}
"""


def _roff(line: str) -> str:
    """A plain text line as roff: backslashes escaped, a leading ' or . not a request."""
    line = line.replace("\\", "\\e")
    return "\\&" + line if line.startswith(("'", ".")) else line


def _examples(groups: tuple[tuple[Command, ...], ...]) -> str:
    lines = [".SH EXAMPLES", ".nf"]
    for group in groups:
        for c in group:
            for sub in (c, *c.subcommands):
                lines += [_roff(e) for e in sub.examples]
    return "\n".join([*lines, ".fi", ""])


def manpage(parser: argparse.ArgumentParser, groups: tuple[tuple[Command, ...], ...]) -> str:
    from argparse_manpage.manpage import Manpage
    page = Manpage(parser, _data={"project_name": "blockxfer", "version": __version__,
                                  "description": "block-level snapshot transfer",
                                  "url": "docs/ in the source tree"})
    return str(page).rstrip("\n") + "\n" + _examples(groups) + (
        ".SH SEE ALSO\n"
        "blockxfer help TOPIC (cp, plane, snapshot, shadow, master, pointer, expressions,\n"
        "levels, transports, exit-codes)\n")


def completion(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab
    return str(shtab.complete(parser, shell=shell,
                              preamble=BASH_PREAMBLE if shell == "bash" else ""))


def cmd_man(a: argparse.Namespace) -> Report:
    from .app import GROUPS, build_parser
    text = manpage(build_parser(), GROUPS)
    return Report({"format": "man", "text": text}, text.rstrip("\n").splitlines())


def cmd_completion(a: argparse.Namespace) -> Report:
    from .app import build_parser
    text = completion(build_parser(), a.shell)
    return Report({"shell": a.shell, "text": text}, text.rstrip("\n").splitlines())


COMMANDS = (
    Command("man", "print the manual page (roff), generated from this parser",
            "Print blockxfer(1) in roff, generated from the same parser as --help "
            "(argparse-manpage).",
            ("blockxfer man | man -l -", "blockxfer man > /usr/local/share/man/man1/blockxfer.1"),
            cmd_man),
    Command("completion", "print the shell completion script for bash or zsh",
            "Print a completion script for bash or zsh (shtab): commands, options and "
            "file names complete.",
            ("source <(blockxfer completion bash)",
             "blockxfer completion zsh > ~/.zfunc/_blockxfer"),
            cmd_completion,
            (arg("shell", choices=SHELLS, metavar="SHELL", help="bash or zsh"),)),
)
