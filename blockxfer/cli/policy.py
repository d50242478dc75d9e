"""`blockxfer policy set|show|clear|run`: snapshot schedules and retention
(blockxfer/transfer/policy.py, docs/policies.md).

The policy lives in the volume's local property `policy`. On a served volume
the commands run in its service, which also runs the schedule itself (a job
every minute), so no timer is needed there.
"""

from __future__ import annotations

import argparse

from blockxfer.transfer.policy import CLASSES, Policy, RunResult

from .common import dry_run_arg, result_of, volume_arg
from .spec import Command, Report, arg


def cmd_set(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import open_session
    pol = Policy.parse(a.classes)
    with open_session(a.path, write=True) as s:
        s.policy("set", pol.to_json().decode())
    return Report({"volume": a.path, "policy": dict(pol.keep)},
                  [f"{a.path}: policy {pol.text()}"])


def cmd_clear(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import open_session
    with open_session(a.path, write=True) as s:
        s.policy("clear")
    return Report({"volume": a.path, "policy": None},
                  [f"{a.path}: no policy (its snapshots stay)"])


def cmd_show(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import open_session
    with open_session(a.path) as s:
        data = {"volume": a.path, **s.policy("show")}
    if data["policy"] is None:
        return Report(data, [f"{a.path}: no policy (blockxfer policy set {a.path} daily=7 ...)"])
    text = [f"{a.path}: policy {Policy(data['policy']).text()}"]
    for c, row in data["classes"].items():
        newest = row["snapshots"][0] if row["snapshots"] else "-"
        text.append(f"  {c:8} keep {row['keep']:>4}  have {len(row['snapshots']):>4}  "
                    f"newest {newest:22} next period {row['next']}")
    text += [f"  due now: {' '.join(data['due']) or '-'}",
             f"  expired: {' '.join(data['expired']) or '-'}"]
    if data["kept_protected"]:
        text.append(f"  expired but kept (master, pointer or hold): "
                    f"{' '.join(data['kept_protected'])}")
    if data["skipped"]:
        text.append(f"  a run does nothing: {data['skipped']}")
    return Report(data, text)


def _run_lines(path: str, r: RunResult) -> list[str]:
    if r.skipped:
        return [f"{path}: nothing to do: {r.skipped}"]
    verb = ("would take", "would destroy") if r.dry_run else ("took", "destroyed")
    lines = [f"{path}@{n}: {verb[0]}" for n in r.taken]
    lines += [f"{path}@{n}: {verb[1]} (expired)" for n in r.pruned]
    lines += [f"{path}@{n}: expired, kept (master, pointer or hold)" for n in r.kept_protected]
    return lines or [f"{path}: nothing due, nothing expired"]


def cmd_run(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import open_session
    with open_session(a.path, write=not a.dry_run) as s:
        result = RunResult(**s.policy("run", dry_run=a.dry_run))
    return Report({"volume": a.path, **result_of(result)}, _run_lines(a.path, result))


SUBCOMMANDS = (
    Command("set", "set a volume's snapshot schedule and retention",
            "Set the policy: for each class (hourly, daily, weekly, monthly, yearly) how "
            "many scheduled snapshots to keep. A class left out is not managed; 0 takes "
            "none and prunes those there are. Replaces the whole policy.",
            ("blockxfer policy set /srv/vol.img hourly=24 daily=7 weekly=4 monthly=12",),
            cmd_set,
            (volume_arg(),
             arg("classes", nargs="+", metavar="CLASS=COUNT",
                 help=f"how many to keep of a class: {', '.join(CLASSES)}"))),
    Command("show", "show the policy, its snapshots and what is due",
            "Show the policy, each class's snapshots and next period, and what a run "
            "would take and prune now.",
            ("blockxfer policy show /srv/vol.img",
             "blockxfer policy show /srv/vol.img --json | jq .due"),
            cmd_show, (volume_arg(),)),
    Command("clear", "remove a volume's policy (its snapshots stay)",
            "Remove the policy; the scheduled snapshots stay until destroyed by hand.",
            ("blockxfer policy clear /srv/vol.img",),
            cmd_clear, (volume_arg(),)),
    Command("run", "take the snapshots that are due and prune the expired ones, once",
            "One run of the schedule, for a timer (blockxfer-policy@.timer): destroy "
            "scheduled snapshots beyond their class's count (never a master, a pointer's "
            "target or a held one), then take one per class whose period has none yet. "
            "Names are the period in UTC: hourly.20261130T14, daily.20261130, "
            "weekly.2026W48, monthly.202611, yearly.2026. Running it twice does nothing "
            "more.",
            ("blockxfer policy run /srv/vol.img",
             "blockxfer policy run /srv/vol.img -n   # what it would do"),
            cmd_run, (volume_arg(), dry_run_arg("print what would be taken and destroyed"))),
)

COMMANDS = (
    Command("policy", "snapshot schedules and retention (hourly=24 daily=7 ...)",
            "Scheduled snapshots and their retention, kept in the volume (docs/policies.md).",
            ("blockxfer policy set /srv/vol.img hourly=24 daily=7",
             "blockxfer policy run /srv/vol.img"),
            subcommands=SUBCOMMANDS),
)
