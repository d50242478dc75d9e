"""Moved: the control socket's client is `blockxfer.service` now.

Commands use `blockxfer.service.session.open_session`, which gives the volume
opened here or a proxy to the service that owns it. These names stay for code
written against this module: each function asks the service that owns `path`
and returns None when nobody serves it.
"""

from __future__ import annotations

from typing import Any

from blockxfer.service.control import ServerNotRunning
from blockxfer.service.ops import image_report, snapshot_row, snapshots_listing
from blockxfer.service.session import ControlClient, ServedSession, server_for

Result = dict[str, Any]

__all__ = ["ControlClient", "server_for", "image_report", "snapshot_row", "snapshots_listing",
           "info", "snapshots", "snapshot", "destroy", "image", "holds", "try_call"]


def try_call(path: str, command: str, **args: Any) -> Any:
    """Run `command` in the service owning `path`; None when there is none."""
    client = server_for(path)
    if client is None:
        return None
    try:
        return client.call(command, **args)
    except ServerNotRunning:
        return None


def _served(path: str) -> ServedSession | None:
    client = server_for(path)
    return ServedSession(client) if client is not None else None


def info(path: str) -> Result | None:
    s = _served(path)
    return s.info() if s else None


def snapshots(path: str) -> Result | None:
    s = _served(path)
    return s.snapshots() if s else None


def snapshot(path: str, name: str, *, shadow: bool = False, master: bool = False,
             freeze: str | None = None) -> Result | None:
    s = _served(path)
    return s.snapshot(name, shadow=shadow, master=master, freeze=freeze) if s else None


def destroy(path: str, name: str) -> Result | None:
    s = _served(path)
    return s.destroy(name) if s else None


def image(path: str, expression: str) -> Result | None:
    s = _served(path)
    return s.image(expression) if s else None


def holds(path: str, op: str, snapshot: str | None = None,
          tag: str | None = None) -> Result | None:
    """`op` is "hold", "release" or "list"; returns the volume's holds afterwards."""
    s = _served(path)
    return s.holds(op, snapshot, tag) if s else None
