"""Incremental mirroring and reintegration: a base image on a slow medium and a
sparse, checksummed, crash-safe structure of the blocks that differ from it
(docs/increments.md; its bytes: docs/increments-format.md)."""

from .base import Openers
from .mirror import mirror_update, update_volume, use_openers
from .reintegrate import reintegrate, reintegrate_plan
from .status import mirror_status

__all__ = ["Openers", "mirror_status", "mirror_update", "reintegrate", "reintegrate_plan",
           "update_volume", "use_openers"]
