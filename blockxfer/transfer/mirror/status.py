"""What `mirror status` reports: the last update, the lag, the next update, errors,
and whether the destination holds a consistent mirrored state."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from blockxfer.volume import Volume

from .state import MirrorState
from .target import Found


def destination_state(st: MirrorState, found: Found | None) -> dict[str, Any]:
    """Consistent means the destination's committed root is a whole mirrored
    snapshot. Every receive commits atomically, so it holds even mid-update; what
    varies is which snapshot it is, and whether local writes sit on top."""
    if found is None:
        return {"consistent": True, "holds": st.snap, "checked": False,
                "note": "a remote destination commits each update atomically (not looked at)"}
    if not found.exists:
        return {"consistent": st.snap is None, "holds": None, "checked": True,
                "note": "no volume there yet"}
    names = found.snapshots
    holds = names.get(found.newest) if found.newest is not None else None
    note = "up to date" if holds == st.snap else ""
    if found.pending is not None:
        note = "an update is in flight or was interrupted (resumed at the next update)"
    elif found.newest is None and found.volume_uuid is not None:
        note = "written there since the last update (discarded at the next update)"
    elif found.other is not None:
        note = f"holds {found.other}, not this mirror"
    consistent = found.other is None and (found.volume_uuid is not None or st.snap is None)
    return {"consistent": consistent, "holds": holds or st.snap, "checked": True,
            "note": note}


def describe(st: MirrorState, generation: int | None, found: Found | None,
             runtime: dict[str, Any] | None, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    last = asdict(st.last) if st.last else None
    lag: dict[str, Any] = {"seconds": None, "cps": None, "intervals": None}
    if st.last is not None:
        lag["seconds"] = round(now - st.last.created, 3)
        lag["intervals"] = round((now - st.last.created) / st.every, 2)
        if generation is not None:
            lag["cps"] = max(0, generation - st.last.cp)
    running = bool(runtime and runtime.get("running"))
    return {
        "destination": st.dest, "interval": st.every, "mode": "incremental" if st.incr
        else "full", "base": st.base_url, "increments": st.incr,
        "running": running, "pid": runtime.get("pid") if runtime else None,
        "next_update": runtime.get("next") if running and runtime else None,
        "updating": bool(running and runtime and runtime.get("updating")),
        "snapshot": st.snap, "pending": asdict(st.pending) if st.pending else None,
        "last": last, "lag": lag, "skipped_ticks": st.skipped,
        "error": st.err, "error_time": st.err_t, "failures": st.fails,
        "destination_state": destination_state(st, found),
    }


def status_lines(d: dict[str, Any], path: str) -> list[str]:
    def ago(t: float | None) -> str:
        return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    runner = "service" if d.get("served") else "daemon"
    lines = [f"{path} -> {d['destination']} every {d['interval']:g} s"
             + (f" ({runner} pid {d['pid']})" if d["running"] else " (not running)")]
    last = d["last"]
    if last:
        lines.append(f"last update   {ago(last['t'])}: {last['snap']} (CP {last['cp']}), "
                     f"{last['blocks']} blocks, {last['bytes']} bytes, {last['dur']:.2f} s, "
                     f"{last['kind']}")
    else:
        lines.append("last update   none yet")
    lag = d["lag"]
    if lag["seconds"] is not None:
        cps = "" if lag["cps"] is None else f", {lag['cps']} CPs behind"
        lines.append(f"lag           {lag['seconds']:.1f} s ({lag['intervals']} intervals){cps}")
    lines.append(f"next update   {ago(d['next_update']) if d['next_update'] else '-'}"
                 + (" (updating now)" if d["updating"] else ""))
    if d["error"]:
        lines.append(f"error         {ago(d['error_time'])}: {d['error']}"
                     + (f" ({d['failures']} in a row)" if d["failures"] else ""))
    inc = d.get("increments_status")
    if inc is not None:                   # incremental: the directory is the destination
        return _incremental(lines, inc, ago)
    ds = d["destination_state"]
    lines.append(f"destination   {'consistent' if ds['consistent'] else 'NOT consistent'}, "
                 f"at {ds['holds'] or '-'}" + (f"; {ds['note']}" if ds["note"] else ""))
    return lines


def _incremental(lines: list[str], inc: dict[str, Any],
                 ago: Callable[[float | None], str]) -> list[str]:
    """The increments directory's own record of its updates replaces the lines a
    volume destination gets (an incremental update keeps no `last` in the volume)."""
    if inc.get("last_update") and lines[1] == "last update   none yet":
        lines[1] = (f"last update   {ago(inc['last_update'])}: {inc.get('newest_snapshot')} "
                    f"(CP {inc.get('newest_generation')}), {inc['updates']} increments "
                    "since the base")
    if inc["state"] in ("none", "empty"):
        lines.append(f"increments    {inc['directory']}: none yet (the first update makes "
                     "the base)")
    else:
        ratio = f" ({inc['ratio']}x)" if inc.get("ratio") else ""
        lines.append(f"increments    {inc['directory']}: {inc['state']}, "
                     f"{'consistent' if inc['consistent'] else 'NOT consistent'}, "
                     f"{inc['structure_bytes']} bytes on disk for "
                     f"{inc.get('changed_bytes', 0)} changed{ratio}")
    return lines


def would_send(vol: Volume, st: MirrorState) -> dict[str, Any]:
    """`mirror update -n`: what the next update would send, from the planes: the
    blocks the volume holds now that the destination's snapshot does not (all of
    them for the first, full image), and those it would free there."""
    now = vol.active.bits
    base = vol.plane(st.snap) if st.snap and st.snap in vol.snapshot_names() else None
    blocks = (now & ~base).count() if base is not None else now.count()
    freed = (base & ~now).count() if base is not None else 0
    return {"destination": st.dest, "dry_run": True,
            "kind": "incremental" if base is not None else "full",
            "base": st.snap if base is not None else None, "blocks": blocks,
            "bytes": blocks * vol.block_size, "deallocated_blocks": freed}
