"""Snapshot schedules and retention, the sanoid/zrepl habit: `hourly=24 daily=7
weekly=4 monthly=12` kept in the volume's local property `policy`.

A scheduled snapshot is named after the period it stands for, in UTC and in the
ISO 8601 basic form (no '-', which new snapshot names may not hold):
`hourly.20261130T14`, `daily.20261130`, `weekly.2026W48`, `monthly.202611`,
`yearly.2026`. The name is the schedule's whole state: a period is due while no
snapshot of its class names it (or a later period), so a run is idempotent and a
run killed half way is finished by the next one. Within a class the names sort
by time, and retention keeps the newest N of them.

The planning functions are pure (a clock is an argument); `policy_tick` applies
a plan to an open volume. Pruning never destroys a master, a snapshot a pointer
names, or a held snapshot (mirrors and replication hold what they need), and
never touches a snapshot whose name is not a schedule's. Not here: the timer
(the service's jobs or a systemd timer call `policy_tick` / `policy run`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from blockxfer.errors import FormatError, UsageError, VolumeError

if TYPE_CHECKING:        # only named: `blockxfer policy` builds its parser from CLASSES
    from blockxfer.volume.layout import SnapshotEntry

PROPERTY = "policy"
CLASSES = ("hourly", "daily", "weekly", "monthly", "yearly")
MAX_KEEP = 10_000

# class -> (pattern of the period key, how to name the period holding a moment)
_KEY = {"hourly": r"\d{8}T\d{2}", "daily": r"\d{8}", "weekly": r"\d{4}W\d{2}",
        "monthly": r"\d{6}", "yearly": r"\d{4}"}
_NAME = re.compile(rf"^(?P<cls>{'|'.join(CLASSES)})\.(?P<key>[0-9TW]+)$")


def period_key(cls: str, now: datetime) -> str:
    """The key of the period of class `cls` that holds `now` (made UTC)."""
    t = now.astimezone(UTC)
    if cls == "weekly":
        iso = t.isocalendar()
        return f"{iso.year:04d}W{iso.week:02d}"
    fmt = {"hourly": "%Y%m%dT%H", "daily": "%Y%m%d", "monthly": "%Y%m", "yearly": "%Y"}[cls]
    return t.strftime(fmt)


def period_name(cls: str, now: datetime) -> str:
    return f"{cls}.{period_key(cls, now)}"


def parse_name(name: str) -> tuple[str, str] | None:
    """(class, key) of a scheduled snapshot's name; None for any other name."""
    m = _NAME.match(name)
    if m is None or not re.fullmatch(_KEY[m["cls"]], m["key"]):
        return None
    return m["cls"], m["key"]


def class_of(name: str) -> str | None:
    """The schedule class a snapshot's name belongs to, if any."""
    parsed = parse_name(name)
    return parsed[0] if parsed else None


def next_period(cls: str, now: datetime) -> datetime:
    """When the period after the one holding `now` begins (UTC)."""
    t = now.astimezone(UTC)
    if cls == "hourly":
        return t.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if cls == "daily":
        return day + timedelta(days=1)
    if cls == "weekly":
        return day + timedelta(days=7 - t.weekday())
    if cls == "monthly":
        return (day.replace(day=28) + timedelta(days=4)).replace(day=1)
    return day.replace(year=t.year + 1, month=1, day=1)


@dataclass(frozen=True)
class Policy:
    """How many snapshots of each class to keep; a class left out is not managed
    (neither taken nor pruned), 0 takes none and prunes every one of that class."""
    keep: Mapping[str, int]

    def to_json(self) -> bytes:
        ordered = {c: self.keep[c] for c in CLASSES if c in self.keep}
        return json.dumps(ordered, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Policy:
        try:
            data = json.loads(raw)
            return cls(_checked(dict(data), FormatError))
        except (ValueError, TypeError) as e:
            raise FormatError(f"the volume's 'policy' property is not a policy ({e}); set it "
                              "again with 'blockxfer policy set'") from e

    @classmethod
    def parse(cls, words: Iterable[str]) -> Policy:
        """`hourly=24 daily=7 ...` as the command line gives it."""
        keep: dict[str, Any] = {}
        for w in words:
            name, sep, count = w.partition("=")
            if not sep or not count.isdigit():
                raise UsageError(f"{w!r}: write CLASS=COUNT, e.g. daily=7 "
                                 f"(classes: {', '.join(CLASSES)})")
            keep[name] = int(count)
        if not keep:
            raise UsageError(f"give at least one CLASS=COUNT (classes: {', '.join(CLASSES)})")
        return cls(_checked(keep, UsageError))

    def text(self) -> str:
        return " ".join(f"{c}={self.keep[c]}" for c in CLASSES if c in self.keep)


def _checked(keep: dict[str, Any], error: type[FormatError] | type[UsageError]) -> dict[str, int]:
    for name, count in keep.items():
        if name not in CLASSES:
            raise error(f"unknown schedule class {name!r}: use {', '.join(CLASSES)}")
        if type(count) is not int or not 0 <= count <= MAX_KEEP:
            raise error(f"{name}={count!r}: keep a count from 0 to {MAX_KEEP}")
    return keep


@dataclass
class Plan:
    """What a run does: snapshots to take, then snapshots to destroy."""
    take: list[str] = field(default_factory=list)
    prune: list[str] = field(default_factory=list)
    kept_protected: list[str] = field(default_factory=list)   # expired but protected


def due(policy: Policy, names: Iterable[str], now: datetime) -> list[str]:
    """The snapshots to take at `now`: one per managed class whose current period
    has no snapshot yet. A later period's snapshot (the clock went back) counts."""
    newest: dict[str, str] = {}
    for n in names:
        parsed = parse_name(n)
        if parsed is not None:
            c, key = parsed
            newest[c] = max(newest.get(c, key), key)
    out = []
    for c in CLASSES:
        if policy.keep.get(c, 0) > 0:
            key = period_key(c, now)
            if newest.get(c, "") < key:
                out.append(f"{c}.{key}")
    return out


def expired(policy: Policy, names: Iterable[str]) -> list[str]:
    """Scheduled snapshots beyond their class's newest `keep`, newest first; only
    classes the policy names are looked at."""
    by_class: dict[str, list[tuple[str, str]]] = {}
    for n in names:
        parsed = parse_name(n)
        if parsed is not None and parsed[0] in policy.keep:
            by_class.setdefault(parsed[0], []).append((parsed[1], n))
    out: list[str] = []
    for c in CLASSES:
        ranked = sorted(by_class.get(c, []), reverse=True)
        out += [n for _, n in ranked[policy.keep.get(c, 0):]]
    return out


def plan(policy: Policy, names: Iterable[str], protected: set[str], now: datetime) -> Plan:
    """Take what is due, then prune what the taken ones push out; protected
    snapshots stay (and are reported) however old they are."""
    existing = list(names)
    take = due(policy, existing, now)
    old = expired(policy, existing + take)
    return Plan(take, [n for n in old if n not in protected],
                [n for n in old if n in protected])


def protected_names(snapshots: Iterable[SnapshotEntry], pointers: Mapping[str, str],
                    holds: Mapping[str, set[str]]) -> set[str]:
    """Masters, pointer targets and held snapshots: never pruned."""
    names = {e.name for e in snapshots if e.master}
    names |= set(pointers.values())
    names |= {n for n, tags in holds.items() if tags}
    return names


class PolicyVolume(Protocol):
    """What `policy_tick` needs of an open, writable volume."""
    @property
    def pointers(self) -> dict[str, str]: ...
    def snapshots(self) -> list[SnapshotEntry]: ...
    def get_property(self, key: str) -> bytes | None: ...
    def holds(self) -> dict[str, set[str]]: ...
    def is_replica(self) -> bool: ...
    def create_snapshot(self, name: str) -> None: ...
    def destroy_snapshot(self, name: str) -> None: ...


@dataclass
class RunResult:
    policy: dict[str, int] | None
    taken: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    kept_protected: list[str] = field(default_factory=list)
    skipped: str | None = None            # why nothing was done
    dry_run: bool = False


def read_policy(vol: PolicyVolume) -> Policy | None:
    raw = vol.get_property(PROPERTY)
    return None if raw is None else Policy.from_json(raw)


def plan_for(vol: PolicyVolume, now: datetime) -> tuple[Policy | None, Plan, str | None]:
    """The volume's policy, the plan at `now`, and why nothing may be done (or None)."""
    pol = read_policy(vol)
    if pol is None:
        return None, Plan(), "no policy set (blockxfer policy set VOLUME daily=7 ...)"
    if vol.is_replica():
        return pol, Plan(), ("a replica: its snapshots come from its source, and one taken "
                             "here would end its incrementals")
    snaps = vol.snapshots()
    protected = protected_names(snaps, vol.pointers, vol.holds())
    return pol, plan(pol, [e.name for e in snaps], protected, now), None


def policy_status(vol: PolicyVolume, now: datetime) -> dict[str, Any]:
    """`policy show`: the policy, each class's snapshots (newest first) and when
    its next period begins, and what a run at `now` would do."""
    pol, p, why = plan_for(vol, now)
    names = [e.name for e in vol.snapshots()]
    keep = pol.keep if pol else {}
    classes = {c: {"keep": keep[c],
                   "snapshots": sorted((s for s in names if class_of(s) == c), reverse=True),
                   "next": next_period(c, now).strftime("%Y-%m-%dT%H:%M:%SZ")}
               for c in CLASSES if c in keep}
    return {"policy": dict(pol.keep) if pol else None, "classes": classes, "due": p.take,
            "expired": p.prune, "kept_protected": p.kept_protected, "skipped": why}


def policy_tick(vol: PolicyVolume, *, now: datetime | None = None,
                dry_run: bool = False) -> RunResult:
    """One run of the volume's schedule: prune what expired, take what is due.
    The service's jobs call it on a timer; `blockxfer policy run` calls it once.
    A snapshot that became busy meanwhile (a send streams it, a hold came) is
    kept and reported; the next run prunes it."""
    pol, p, why = plan_for(vol, now or datetime.now(UTC))
    result = RunResult(dict(pol.keep) if pol else None, kept_protected=list(p.kept_protected),
                       skipped=why, dry_run=dry_run)
    if dry_run or why:
        result.taken, result.pruned = list(p.take), list(p.prune)
        return result
    for name in p.prune:              # first: a nearly full volume makes room
        try:
            vol.destroy_snapshot(name)
        except VolumeError:           # held or pointed to since the plan: keep it
            result.kept_protected.append(name)
            continue
        result.pruned.append(name)
    for name in p.take:
        vol.create_snapshot(name)
        result.taken.append(name)
    return result
