#!/usr/bin/env python3
"""Print the test bed's summary on the host: tests per device, skip reasons,
then pytest's own summary line last (so CI reads it as the closing line).

Usage: report.py RESULTS_DIR [ACCEL] [SECONDS]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ORDER = ["passed", "failed", "error", "skipped", "xfailed", "not run"]


def main() -> None:
    results = Path(sys.argv[1])
    accel = sys.argv[2] if len(sys.argv) > 2 else "?"
    secs = sys.argv[3] if len(sys.argv) > 3 else "?"
    print()
    print(f"==== vm-testbed summary (guest under {accel}, {secs} s from boot to power-off) ====")
    env = results / "devices.env"
    if env.exists():
        for line in env.read_text().splitlines():
            print(f"  {line}")
    reports = sorted(results.glob("report*.json"))   # report.json, report-tgt.json
    devices: dict[str, dict[str, int]] = {}
    reasons: dict[str, dict[str, int]] = {}
    for rep in reports:
        data = json.loads(rep.read_text())
        for dev, counts in data.get("devices", {}).items():
            d = devices.setdefault(dev, {})
            for k, n in counts.items():
                d[k] = d.get(k, 0) + n
        for dev, rs in data.get("skip_reasons", {}).items():
            r = reasons.setdefault(dev, {})
            for k, n in rs.items():
                r[k] = r.get(k, 0) + n
    if reports:
        print("  tests per device (a test that used several devices counts on each):")
        for dev in sorted(devices, key=lambda d: (d == "(no device)", d)):
            counts = devices[dev]
            parts = [f"{counts[k]} {k}" for k in ORDER if counts.get(k)]
            print(f"    {dev:<20} {', '.join(parts)}")
            for reason, n in sorted(reasons.get(dev, {}).items(), key=lambda kv: -kv[1]):
                print(f"    {'':<20}   skipped {n}: {reason}")
    else:
        print("  (no per-device report: the pytest plugin did not run)")
    # the second passes (tape tests on tgt) first, the main pass's line last
    for log in sorted(results.glob("pytest-*.log")):
        name = log.stem.removeprefix("pytest-")
        print(f"  {name} pass: {_summary(log) or '(pytest printed no summary line)'}")
    print(_summary(results / "pytest.log") or "(pytest printed no summary line)")


def _summary(log: Path) -> str:
    if not log.exists():
        return ""
    rx = re.compile(
        r"^=*\s*(no tests ran|\d+ (passed|failed|skipped|deselected|errors?|xfailed"
        r"|xpassed|warnings?)).* in [\d.]+s"
    )
    summary = ""
    for line in log.read_text(errors="replace").splitlines():
        if rx.match(line.strip()):
            summary = line.strip()
    return summary

if __name__ == "__main__":
    main()
