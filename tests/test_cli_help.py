"""Every --help has a description and an example, every argument help text, the
metavars follow one addressing model, and `blockxfer help TOPIC` explains it."""

from __future__ import annotations

import re

import pytest

from blockxfer.cli.app import GROUPS, build_parser
from blockxfer.cli.spec import Arg, Command, OneOf, Section
from tests.clihelp import bx, one_line
from tests.test_cli_json import ALL

TOPICS = ["cp", "plane", "snapshot", "shadow", "master", "pointer", "expressions", "levels",
          "transports", "exit-codes"]
# positional names that must carry the shared metavars
METAVARS = {"path": {"VOLUME"}, "target": {"VOLUME", "VOLUME@SNAPSHOT", "VOLUME[@SNAPSHOT]"},
            "expression": {"EXPR"}, "destination": {"DESTINATION"}, "source": {"SOURCE"},
            "tape": {"TAPE"}, "stream": {"SOURCE"}}


def all_commands(commands: tuple[Command, ...]) -> list[Command]:
    out: list[Command] = []
    for c in commands:
        out += [c, *all_commands(c.subcommands)]
    return out


def args_of(c: Command) -> list[Arg]:
    out: list[Arg] = []
    for item in c.args:
        out += [item] if isinstance(item, Arg) else list(item.args) \
            if isinstance(item, OneOf | Section) else []
    return out


@pytest.mark.parametrize("c", [c for g in GROUPS for c in all_commands(g)],
                         ids=lambda c: c.name)
def test_every_command_has_a_description_examples_and_argument_help(c: Command) -> None:
    assert c.description and c.help and c.examples
    assert all(e.startswith(("blockxfer ", "command=", "dd ", "nbdfuse ",
                                              "source ")) for e in c.examples)
    for a in args_of(c):
        assert a.options.get("help"), f"{c.name} {a.flags[0]}: no help"
        if a.flags[0] in METAVARS:
            assert a.options.get("metavar") in METAVARS[a.flags[0]], (c.name, a.flags)


@pytest.mark.parametrize("name", sorted(ALL))
def test_help_of_every_command_shows_examples(name: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*name.split(), "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "examples:\n  " in out and "--log-level" in out


def test_help_output_has_description_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["send", "--help"])
    out = capsys.readouterr().out
    assert "examples:\n  blockxfer send" in out and "VOLUME EXPR [DESTINATION]" in out
    assert "Write the stream of an image" in out


def test_top_level_help_says_the_addressing_model() -> None:
    out = bx("--help").stdout.decode()
    for words in ("VOLUME@SNAPSHOT", "VOLUME 'EXPR'", "ssh://", "tls://", "ONE name",
                  "examples:"):
        assert words in out


def test_help_topics() -> None:
    listing = bx("help").stdout.decode()
    for t in TOPICS:
        assert re.search(rf"^  {t} ", listing, re.M), t
        r = bx("help", t)
        assert r.returncode == 0 and len(r.stdout.decode().splitlines()) >= 5, t
    text = bx("help", "expressions").stdout.decode()
    assert "'june3-june1' is ONE" in text and "'june3 - june1' is the difference" in text
    r = bx("help", "nosuch")
    assert r.returncode == 2 and "topics: cp" in one_line(r)
