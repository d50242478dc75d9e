"""A mirror's configuration and progress, kept in the source volume itself.

Local property `mirror` (never replicated, durable on return) holds one compact
JSON object: where the mirror goes and how often, the snapshot the destination
holds (the base of the next update), the update in flight (so a restart resumes
it instead of starting another), and the last update's figures and error. The
property area is small (~3 KiB shared), so keys are short and nothing grows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from blockxfer.errors import FormatError, NotFound

KEY = "mirror"
TAG = "mirror"                   # the hold on the snapshots a mirror needs
PREFIX = "mirror."               # its snapshots: mirror.1, mirror.2, ...
ERROR_MAX = 240                  # characters of the last error kept


class PropertyStore(Protocol):
    """What the state needs of a volume (Volume has it)."""

    def get_property(self, key: str) -> bytes | None: ...
    def set_property(self, key: str, value: bytes | None) -> None: ...


@dataclass
class Pending:
    """The update in flight: its snapshot and the stream id the destination keeps
    for an interrupted receive (so the retry resumes it)."""

    top: str
    sid: str                      # stream id, hex
    full: bool


@dataclass
class Last:
    """The last completed update."""

    t: float                      # when it finished (epoch seconds)
    snap: str
    cp: int                       # the source CP (generation) it mirrored
    created: float                # when that snapshot was taken (epoch seconds)
    bytes: int
    blocks: int
    freed: int
    dur: float
    kind: str                     # full, incremental (mark-on-allocate or plane difference)


@dataclass
class MirrorState:
    dest: str
    every: float = 10.0                        # seconds between updates
    base_url: str | None = None                # incremental mirroring (transfer/increments.py)
    incr: str | None = None
    force: bool = False                        # the first full image may overwrite DEST
    ep: str | None = None                      # an s3:// DEST's endpoint (--s3-endpoint)
    seq: int = 1                               # the next snapshot's number
    snap: str | None = None                    # what the destination holds (the next base)
    guid: str | None = None                    # its guid, hex (found by it at the destination)
    pending: Pending | None = None
    last: Last | None = None
    err: str | None = None
    err_t: float | None = None
    fails: int = 0
    skipped: int = 0                           # ticks skipped (effective next CP)
    stopped: bool = False                      # `mirror stop` of a served volume: its
    #                                            service does not run it after a restart
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def incremental_mode(self) -> bool:
        return self.incr is not None

    def pack(self) -> bytes:
        d = {k: v for k, v in asdict(self).items() if v not in (None, {}, False, 0)}
        d["dest"], d["every"] = self.dest, self.every
        return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def unpack(cls, raw: bytes) -> MirrorState:
        try:
            d = json.loads(raw)
            pending = Pending(**d.pop("pending")) if "pending" in d else None
            last = Last(**d.pop("last")) if "last" in d else None
            return cls(**d, pending=pending, last=last)
        except (ValueError, TypeError, KeyError) as e:
            raise FormatError(f"the mirror state in the volume is damaged ({e}); "
                              "'blockxfer mirror stop --forget' clears it") from e

    def failed(self, error: str, when: float) -> None:
        self.err, self.err_t, self.fails = error[:ERROR_MAX], when, self.fails + 1


def load(vol: PropertyStore, path: str) -> MirrorState:
    raw = vol.get_property(KEY)
    if raw is None:
        raise NotFound(f"{path} has no mirror; start one with 'blockxfer mirror start "
                       f"{path} DEST'")
    return MirrorState.unpack(raw)


def load_if_any(vol: PropertyStore) -> MirrorState | None:
    raw = vol.get_property(KEY)
    return None if raw is None else MirrorState.unpack(raw)


def save(vol: PropertyStore, st: MirrorState) -> None:
    vol.set_property(KEY, st.pack())


def forget(vol: PropertyStore) -> None:
    vol.set_property(KEY, None)
