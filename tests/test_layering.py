"""The core never imports a driver (STYLE.md section 1)."""

import importlib
import pkgutil
import subprocess
import sys

import blockxfer

# the top layer that opens devices and hands them down
WIRING = ("blockxfer.drivers", "blockxfer.cli", "blockxfer.handles", "blockxfer.demo")


def test_core_modules_load_no_driver() -> None:
    core = [m.name for m in pkgutil.walk_packages(blockxfer.__path__, "blockxfer.")
            if not m.name.startswith(WIRING)]
    assert "blockxfer.tape" in core
    code = ("import importlib, sys\n"
            f"for m in {core!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.startswith('blockxfer.drivers'))\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_drivers_import_without_side_effects() -> None:
    for m in pkgutil.iter_modules(importlib.import_module("blockxfer.drivers").__path__):
        importlib.import_module(f"blockxfer.drivers.{m.name}")
