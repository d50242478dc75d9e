"""`blockxfer devices`: block devices, tape drives and media changers."""

from __future__ import annotations

import argparse

from blockxfer.units import human

from .spec import Command, Report


def cmd_devices(a: argparse.Namespace) -> Report:
    from blockxfer.drivers.discovery import discover

    found = discover()
    text = [f"{'DEVICE':16} {'TYPE':9} {'SIZE':>10}  IN USE"]
    for b in found["block"]:
        use = ", ".join([f"mounted {m}" for m in b["mountpoints"]] + b["users"]) or "-"
        text.append(f"{b['path']:16} {b['type']:9} {human(b['size']):>10}  {use}")
    for t in found["tape"]:
        text.append(f"{t['path']:16} {'tape':9} {'':>10}  {t['vendor']} {t['model']} "
                    f"serial {t['serial'] or '?'} sg {t['sg'] or '-'}")
    for c in found.get("changer", []):
        text.append(f"{c['path']:16} {'changer':9} {'':>10}  {c['vendor']} {c['model']} "
                    f"at {c['address'] or '?'}")
    return Report(found, text)


COMMANDS = (
    Command("devices", "list block devices, tape drives and media changers",
            "List block devices (with what mounts or holds them), tape drives and media "
            "changers.",
            ("blockxfer devices", "blockxfer devices --json | jq '.tape[].path'"),
            cmd_devices),
)
