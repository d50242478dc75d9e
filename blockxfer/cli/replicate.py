"""`blockxfer replicate ...`: pull a source's masters (pull), and see and manage who
replicates (status, destinations, forget)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from blockxfer.errors import BlockxferError, DeviceError, UsageError
from blockxfer.units import human, parse_duration, parse_size

from .common import dry_run_arg, parsable_arg, progress, volume_arg
from .spec import Command, Report, arg


def duration(text: str) -> float:
    """An argparse type: 90, 30s, 1m, 2h, 1d (units.parse_duration)."""
    try:
        return parse_duration(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def rate(text: str) -> int:
    """An argparse type: bytes per second, with K, M, G suffixes (10M = 10 MiB/s)."""
    try:
        value = parse_size(text.removesuffix("/s"))
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    if value <= 0:
        raise argparse.ArgumentTypeError("--bwlimit must be positive")
    return value


def _line(r: dict[str, Any]) -> str:
    where = f"{r['target']} from {r['source']}"
    if r["dry_run"]:
        what = {"full": f"a full image of {r['top']!r}", "current": "nothing (up to date)",
                "incremental": f"{r['top']!r} - {r['base']!r}"}[r["kind"]]
        return f"would pull {what} into {r['target']}: {r['blocks']} blocks"
    back = f" after rolling back to {r['rolled_back']!r}" if r["rolled_back"] else ""
    if r["kind"] == "current":
        return f"{where}: up to date at master {r['top']!r}{back}"
    how = "full image" if r["kind"] == "full" else f"incremental from {r['base']!r}"
    dropped = r.get("dropped_holds")
    return (f"{where}: {how} up to master {r['top']!r}{back}, {r['blocks']} blocks, "
            f"{human(r['bytes'])} in {r['seconds']:.1f} s ({human(r['rate'])}/s)"
            + (" (resumed)" if r["resumed"] else "")
            + (f"; dropped the holds on snapshots gone here: {', '.join(dropped)}"
               if dropped else ""))


def cmd_pull(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.blockdev import open_device
    from blockxfer.service.replication import hosting
    from blockxfer.service.session import server_for
    from blockxfer.transfer.replicate import PullRecord, pull_every, pull_once
    options: dict[str, Any] = {"name": a.name, "rollback": a.rollback, "bwlimit": a.bwlimit,
                               "dry_run": a.dry_run, "compress": a.compress}
    if a.every is not None and a.dry_run:
        raise UsageError("--every repeats pulls; a dry run (-n) is one look")
    client = server_for(a.target)
    if client is not None:
        return _pull_served(a, client, options)
    if a.every is not None:
        def report(r: PullRecord | BlockxferError) -> None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
            text = _line(r.as_dict()) if isinstance(r, PullRecord) else f"pull failed: {r}"
            print(f"{stamp} {text}", file=sys.stderr if isinstance(r, BlockxferError)
                  else sys.stdout, flush=True)
        pull_every(a.source, a.target, open_device, a.every, report=report, host=hosting,
                   **options)
    prog = progress(a, "pull")
    rec = pull_once(a.source, a.target, open_device, progress=prog.add, host=hosting, **options)
    prog.finish()
    data = rec.as_dict()
    return Report(data, [_line(data)])


def _pull_served(a: argparse.Namespace, client: Any, options: dict[str, Any]) -> Report:
    """A served target: its service pulls (incrementals, into the open volume); with
    --every the schedule is kept in the volume and run by the service's job."""
    text = []
    if a.every is not None:
        client.call("replicate_schedule", op="set", every=a.every, source=a.source,
                    **{k: options[k] for k in ("name", "rollback", "bwlimit", "compress")})
        text.append(f"{a.target}: its service pulls from {a.source} every {a.every:g} s "
                    f"('blockxfer replicate stop {a.target}' ends it)")
    prog = progress(a, "pull")
    data = client.call("replicate_pull", timeout=None, progress=prog.add, source=a.source,
                       **options)
    prog.finish()
    return Report(data, [_line(data), *text])


def cmd_status(a: argparse.Namespace) -> Report:
    from blockxfer.transfer.replicate_state import PullState, all_states
    for t in a.targets or []:
        if not os.path.exists(t):
            raise DeviceError(f"{t}: no such file or device")
    states = [PullState.load(t) for t in a.targets] if a.targets else all_states()
    rows = []
    text = []
    for s in states:
        last = s.pulls[-1] if s.pulls else None
        rows.append({"target": s.target, "source": s.source, "name": s.name,
                     "master": s.master, "pending": s.pending, "last": last,
                     "pulls": s.pulls})
        if not (s.source or s.pulls or s.pending):
            text.append(f"{s.target}: no pulls recorded here")
            continue
        line = f"{s.target}: from {s.source or '-'} as {s.name or '-'}, master {s.master!r}"
        if s.pending:
            line += f", interrupted pull of {s.pending.get('top')!r} (resumes on the next pull)"
        if last:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["started"]))
            line += (f"; last pull {when} {last['kind']}, {human(last['bytes'])} in "
                     f"{last['seconds']:.1f} s")
        text.append(line)
    sources = []
    for t in a.targets or []:
        d = _destinations(t, quiet=True)
        if d:
            sources.append({"volume": t, "destinations": d})
            text += [f"{t}: serves {r['name']} ({r['identity']}): confirmed {r['confirmed']!r}, "
                     f"holds {', '.join(r['holds']) or '-'}" for r in d]
    if not text:
        text = ["no replication here (no pulls recorded, no destinations named)"]
    return Report({"pulls": rows, "sources": sources}, text)


def _destinations(path: str, *, quiet: bool = False) -> list[dict[str, Any]]:
    from blockxfer.handles import open_volume
    from blockxfer.service.session import server_for
    from blockxfer.transfer.replicate_registry import listing
    try:
        client = server_for(path)
        if client is not None:
            return list(client.call("replicate_destinations")["destinations"])
        with open_volume(path) as vol:
            return listing(vol)
    except BlockxferError:
        if quiet:
            return []
        raise


def cmd_destinations(a: argparse.Namespace) -> Report:
    rows = _destinations(a.path)
    if not rows:
        return Report({"volume": a.path, "destinations": []},
                      [f"{a.path}: no destinations have pulled from it"])
    text = [f"{'NAME':16} {'IDENTITY':24} {'CONFIRMED':16} {'LAST CONTACT':20} HOLDS"]
    for r in rows:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_contact"]))
        text.append(f"{r['name']:16} {r['identity']:24} {r['confirmed'] or '-':16} {seen:20} "
                    f"{','.join(r['holds']) or '-'}")
    return Report({"volume": a.path, "destinations": rows}, text)


def cmd_forget(a: argparse.Namespace) -> Report:
    from blockxfer.handles import open_volume
    from blockxfer.service.session import server_for
    from blockxfer.transfer.replicate_registry import forget
    client = server_for(a.path)
    if client is not None:
        released = list(client.call("replicate_forget", dest=a.dest)["released"])
    else:
        with open_volume(a.path, write=True) as vol:
            released = forget(vol, a.dest)
    return Report({"volume": a.path, "destination": a.dest, "released": released},
                  [f"{a.path}: forgot {a.dest}; released "
                   f"{', '.join(repr(s) for s in released) or 'no holds'}"])


def cmd_stop(a: argparse.Namespace) -> Report:
    from blockxfer.service.session import server_for
    client = server_for(a.path)
    if client is None:
        raise UsageError(f"{a.path} is not served, so no service pulls into it; a "
                         "'replicate pull --every' in the foreground stops with Ctrl-C")
    before = client.call("replicate_schedule", op="show")
    client.call("replicate_schedule", op="clear")
    what = f"stopped pulling from {before['source']}" if before else "had no scheduled pulls"
    return Report({"volume": a.path, "stopped": before}, [f"{a.path}: {what}"])


SUBCOMMANDS = (
    Command("pull", "pull the source's newest master into a target (the destination's side)",
            "Ask the volume at SOURCE (ssh:// or tls://) for its newest master: the "
            "incremental from the newest master both hold, or a full image when they share "
            "none. A target changed here is rolled back to that master only with "
            "--rollback, else refused (exit 5). A cut pull resumes on the next one. "
            "A served target is pulled into by its service (incrementals only), and "
            "--every then becomes the service's schedule.",
            ("blockxfer replicate pull ssh://prod/srv/vol.img /srv/copy.img",
             "blockxfer replicate pull ssh://prod/srv/vol.img /srv/copy.img --every 1m",
             "blockxfer replicate pull -n tls://prod:10811/srv/vol.img /srv/copy.img"),
            cmd_pull,
            (arg("source", metavar="SOURCE",
                 help="the source volume: ssh://[user@]host/PATH or tls://host:port/PATH"),
             arg("target", metavar="VOLUME", help="the target: the volume (or new volume) here"),
             arg("--every", type=duration, metavar="INTERVAL",
                 help="pull again every INTERVAL (30s, 1m, 2h), in the foreground (a "
                      "served target: in its service)"),
             arg("--rollback", action="store_true",
                 help="discard changes made here (back to the newest common master), or "
                      "overwrite a target that shares no master with the source"),
             arg("--bwlimit", type=rate, metavar="RATE",
                 help="at most RATE bytes of stream per second (10M = 10 MiB/s)"),
             arg("--name", metavar="NAME",
                 help="this destination's name at the source (default: the host name)"),
             arg("--no-compress", dest="compress", action="store_false",
                 help="ask for uncompressed data records"),
             dry_run_arg("ask the source what it would send"), parsable_arg())),
    Command("stop", "stop the scheduled pulls into a served volume",
            "A 'replicate pull --every' into a volume that 'blockxfer serve' owns is run "
            "by its service, from a schedule kept in the volume; this removes it.",
            ("blockxfer replicate stop /srv/copy.img",),
            cmd_stop, (volume_arg(),)),
    Command("status", "pulls recorded here, and the destinations of the volumes named",
            "The pulls this host made (per target: source, master reached, an interrupted "
            "pull, the last pulls with bytes, blocks, seconds and rate) and, for each "
            "volume named that is a source, its destinations.",
            ("blockxfer replicate status", "blockxfer replicate status /srv/vol.img --json"),
            cmd_status,
            (arg("targets", nargs="*", metavar="VOLUME",
                 help="only these targets (default: every pull recorded here)"),)),
    Command("destinations", "the destinations a source volume knows and the holds they keep",
            "The destinations registered in a source volume: name, identity, the master "
            "each confirmed, last contact, and the masters held for it.",
            ("blockxfer replicate destinations /srv/vol.img",),
            cmd_destinations, (volume_arg(),)),
    Command("forget", "drop a destination and release the masters held for it",
            "Remove a destination from a source volume's registry and release its holds; "
            "its next pull registers it again (a full image if its master is gone).",
            ("blockxfer replicate forget /srv/vol.img mirror2",),
            cmd_forget,
            (volume_arg(), arg("dest", metavar="DEST", help="the destination's name"))),
)

COMMANDS = (
    Command("replicate", "volume replication: destinations pull masters (pull, status, ...)",
            "Replication pulled by the destination with its newest master; the source "
            "holds every master a registered destination still needs (docs/replication.md).",
            ("blockxfer replicate pull ssh://prod/srv/vol.img /srv/copy.img",
             "blockxfer replicate destinations /srv/vol.img"),
            subcommands=SUBCOMMANDS),
)
