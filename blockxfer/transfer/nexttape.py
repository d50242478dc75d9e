"""Which way the next tape of a set comes when a dump or restore fills or ends
one: a media changer, the operator's --next-tape command, or the operator at a
terminal. The caller hands in the changer loader and the prompt (they touch a
device and a terminal); this module only decides among them."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from blockxfer.errors import UsageError

NextTape = Callable[[str, int], str]              # (set name, sequence) -> the tape's path
ChangerLoader = Callable[[str, int, str], NextTape]  # (changer, drive number, drive path)


@dataclass(frozen=True)
class TapeSetPolicy:
    tape: str                       # the drive (or virtual tape) the set is written through
    command: str | None = None      # --next-tape: prints the next tape's path
    changer: str | None = None      # --changer: /dev/sgN of a media changer
    changer_drive: int = 0
    verify: bool = False            # the dump reads its image back afterwards


def next_tape_finder(policy: TapeSetPolicy, *, load_changer: ChangerLoader,
                     ask: NextTape | None) -> NextTape | None:
    """The provider of the next tape, or None when a set cannot continue (the
    dump or restore then stops at the end of the tape with a clear error)."""
    if policy.changer:
        if policy.command:
            raise UsageError("give --changer or --next-tape, not both")
        if policy.verify:
            # the drive ends on the set's last tape; verify reads from the first
            raise UsageError("--verify does not work with --changer yet; load the first tape "
                             "and run 'blockxfer restore' or 'tape list' to check the image")
        return load_changer(policy.changer, policy.changer_drive, policy.tape)
    if policy.command:
        return command_next_tape(policy.command)
    return ask


def command_next_tape(command: str) -> NextTape:
    """Run the operator's shell command with the set and sequence in its
    environment; the last line it prints is the tape's path."""
    def run(set_name: str, seq: int) -> str:
        env = dict(os.environ, BLOCKXFER_TAPE_SET=set_name, BLOCKXFER_TAPE_SEQ=str(seq))
        r = subprocess.run(command, shell=True, env=env, capture_output=True, text=True)
        path = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        if r.returncode != 0 or not path:
            raise UsageError(f"--next-tape command gave no tape for {set_name} #{seq} "
                             f"(exit {r.returncode}): {r.stderr.strip()[:200]}")
        return path
    return run
