"""pytest plugin loaded in the test bed guest (`-p testbed_report`).

It records which devices each test touched so the host can say how many tests
ran on each one.  A test "used" a device when, during its setup or call, the
process opened the device node or a sysfs file of it (seen with an audit hook
on `open`), or started a subprocess naming it.  A test may also say so itself
with `@pytest.mark.device("tape")` (or any label).  Results go to the JSON
file named by $TESTBED_REPORT.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict
from typing import Any

import pytest

_current: set[str] | None = None
_labels: dict[str, str] = {}


def _device_labels() -> dict[str, str]:
    """Device node basename -> label, from the BLOCKXFER_TEST_* variables."""
    labels: dict[str, str] = {}

    def add(var: str, label: str) -> None:
        for p in filter(None, os.environ.get(var, "").split(",")):
            labels[os.path.basename(p)] = label

    kind = _tape_kind()
    add("BLOCKXFER_TEST_TAPE", f"tape {kind}")
    add("BLOCKXFER_TEST_TAPE_SMALL", f"tape {kind} (small)")
    add("BLOCKXFER_TEST_CHANGER", f"changer {kind}")
    add("BLOCKXFER_TEST_CHANGER_TAPE", f"changer {kind}")
    add("BLOCKXFER_TEST_MD0", "md raid0")
    add("BLOCKXFER_TEST_MD5", "md raid5")
    add("BLOCKXFER_TEST_NBD", "nbd")
    add("BLOCKXFER_TEST_DISKS", "disk")
    add("BLOCKXFER_TEST_EXTRA_DISKS", "extra disk")
    return labels


def _tape_kind() -> str:
    """mhvtl or tgt (or host-sg, iscsi): the tape implementation of this pass."""
    return os.environ.get("BLOCKXFER_TEST_TAPE_KIND") or "?"


_PATTERNS = [
    (re.compile(r"^/dev/n?st\d+[lma]?$"), "tape"),
    (re.compile(r"^/sys/class/scsi_tape/"), "tape"),
    (re.compile(r"^/dev/loop\d+$|^/sys/(block|devices/virtual/block)/loop\d+"), "loop"),
    (re.compile(r"^/dev/md\d+$"), None),
    (re.compile(r"^/dev/nbd\d+$"), "nbd"),
    (re.compile(r"^/dev/vd[a-z]+$"), None),
    (re.compile(r"^/dev/sg\d+$"), "tape"),
]
_SYSFS_BLOCK = re.compile(r"^/sys/(?:class/block|block|devices/virtual/block)/([^/]+)")


def _classify(path: str) -> str | None:
    if not path.startswith(("/dev/", "/sys/")):
        return None
    base = os.path.basename(path)
    if path.startswith("/dev/") and base in _labels:
        return _labels[base]
    m = _SYSFS_BLOCK.match(path)
    if m and m.group(1) in _labels:
        return _labels[m.group(1)]
    for rx, label in _PATTERNS:
        if rx.search(path):
            return f"tape {_tape_kind()}" if label == "tape" else label or base
    return None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _current is None:
        return
    try:
        if event == "open":
            path = args[0]
            if isinstance(path, bytes):
                path = os.fsdecode(path)
            if isinstance(path, str):
                label = _classify(path)
                if label:
                    _current.add(label)
        elif event == "subprocess.Popen":
            argv = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            for a in argv:
                if isinstance(a, (str, bytes)):
                    label = _classify(os.fsdecode(a))
                    if label:
                        _current.add(label)
    except Exception:  # an audit hook must never break the test
        pass


class _Recorder:
    def __init__(self, path: str) -> None:
        self.path = path
        self.tests: dict[str, dict[str, Any]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: Any) -> Any:
        global _current
        used: set[str] = set()
        for m in item.iter_markers("device"):
            # "tape" names the tape of this pass: "tape mhvtl", "tape tgt"
            used.update(f"tape {_tape_kind()}" if a == "tape" else str(a) for a in m.args)
        _current = used
        self.tests[item.nodeid] = {"devices": used, "outcome": None, "reason": ""}
        try:
            yield
        finally:
            _current = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        t = self.tests.setdefault(report.nodeid, {"devices": set(), "outcome": None, "reason": ""})
        if report.skipped:
            t["outcome"] = "skipped"
            lr = report.longrepr
            if isinstance(lr, tuple) and len(lr) == 3:
                t["reason"] = str(lr[2]).removeprefix("Skipped: ")
        elif report.failed:
            t["outcome"] = "failed" if report.when == "call" else "error"
        elif report.when == "call" and t["outcome"] is None:
            t["outcome"] = "xfailed" if hasattr(report, "wasxfail") else "passed"

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        per_dev: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        reasons: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for t in self.tests.values():
            outcome = t["outcome"] or "not run"
            for d in sorted(t["devices"]) or ["(no device)"]:
                per_dev[d][outcome] += 1
                if outcome == "skipped":
                    reasons[d][t["reason"]] += 1
        out = {
            "exitstatus": int(exitstatus),
            "devices": {d: dict(c) for d, c in per_dev.items()},
            "skip_reasons": {d: dict(r) for d, r in reasons.items()},
            "env": {k: v for k, v in os.environ.items() if k.startswith("BLOCKXFER_TEST_")},
            "tests": {k: {**v, "devices": sorted(v["devices"])} for k, v in self.tests.items()},
        }
        with open(self.path, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)


def pytest_configure(config: pytest.Config) -> None:
    global _labels
    path = os.environ.get("TESTBED_REPORT")
    if not path:
        return
    _labels = _device_labels()
    sys.addaudithook(_audit)
    config.pluginmanager.register(_Recorder(path), "testbed_recorder")
