"""The destination's own record of its pulls: one small JSON file per target.

Kept outside the volume on purpose: a first pull (or a full one after a
rollback) writes over the target, so the stream it is receiving, and the
ticket that lets it resume, must live where the stream cannot reach. The file
is `$BLOCKXFER_STATE_DIR` (default /var/lib/blockxfer) / `replicate-<hash of the
target's real path>.json`, replaced atomically. It holds the source, this
destination's name, the master reached, the pending stream (id, expression,
top and base guids, ticket) and the last pulls (bytes, blocks, seconds, rate).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from blockxfer.errors import DeviceError

STATE_DIR = "/var/lib/blockxfer"
HISTORY = 20


def state_dir() -> str:
    return os.environ.get("BLOCKXFER_STATE_DIR", STATE_DIR)


def state_path(target: str) -> str:
    digest = hashlib.sha256(os.path.realpath(target).encode()).hexdigest()[:32]
    return os.path.join(state_dir(), f"replicate-{digest}.json")


@dataclass
class PullState:
    target: str
    source: str | None = None
    name: str | None = None
    master: str | None = None               # the newest master reached
    pending: dict[str, Any] | None = None   # the stream being received, with its ticket
    pulls: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, target: str) -> PullState:
        try:
            with open(state_path(target)) as f:
                data = json.load(f)
            return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except FileNotFoundError:
            return cls(os.path.realpath(target))
        except (OSError, ValueError, TypeError):
            return cls(os.path.realpath(target))     # unreadable: start over, never fail

    def record(self, pull: dict[str, Any]) -> None:
        self.pulls = [*self.pulls, pull][-HISTORY:]

    def save(self) -> None:
        path = state_path(self.target)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(asdict(self), f, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise DeviceError(f"cannot record the pull state in {path}: {e.strerror}; "
                              "set $BLOCKXFER_STATE_DIR to a writable folder") from e


def all_states() -> list[PullState]:
    try:
        names = sorted(os.listdir(state_dir()))
    except OSError:
        return []
    out = []
    for n in names:
        if n.startswith("replicate-") and n.endswith(".json"):
            try:
                with open(os.path.join(state_dir(), n)) as f:
                    data = json.load(f)
                out.append(PullState(**{k: v for k, v in data.items()
                                        if k in PullState.__dataclass_fields__}))
            except (OSError, ValueError, TypeError):
                continue
    return out
