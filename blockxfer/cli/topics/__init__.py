"""`blockxfer help [TOPIC]`: the concepts, from text files shipped in this package."""

from __future__ import annotations

import argparse
from importlib import resources

from blockxfer.errors import UsageError

from ..spec import Command, Report, arg


def topics() -> dict[str, str]:
    """Topic name -> its text, from the *.txt files beside this module."""
    files = resources.files(__name__)
    return {f.name.removesuffix(".txt"): f.read_text(encoding="utf-8")
            for f in files.iterdir() if f.name.endswith(".txt")}


def cmd_help(a: argparse.Namespace) -> Report:
    known = topics()
    if a.topic is None:
        names = sorted(known)
        firsts = {n: known[n].splitlines()[0] for n in names}
        return Report({"topics": firsts},
                      ["topics (blockxfer help TOPIC):"]
                      + [f"  {n:12} {firsts[n]}" for n in names])
    text = known.get(a.topic.lower())
    if text is None:
        raise UsageError(f"no help topic {a.topic!r}; topics: {', '.join(sorted(known))}")
    return Report({"topic": a.topic.lower(), "text": text}, text.rstrip("\n").splitlines())


COMMANDS = (
    Command("help", "explain a concept: cp, plane, snapshot, expressions, levels, ...",
            "Explain one of blockxfer's concepts; without TOPIC, list the topics.",
            ("blockxfer help", "blockxfer help expressions"),
            cmd_help,
            (arg("topic", nargs="?", metavar="TOPIC",
                 help="cp, plane, snapshot, shadow, master, pointer, expressions, levels, "
                      "transports or exit-codes"),)),
)
