"""Volume mirroring (the patent's "Volume Mirroring", full mirroring): a full image,
then on each timer tick an incremental chosen by the mark-on-allocate buffers,
into a destination that commits each update atomically. See docs/mirroring.md.

state.py keeps the configuration and progress in the source volume, plan.py
chooses the blocks, target.py opens the destination, update.py runs one update,
loop.py the timer, status.py reports.
"""

from .loop import Tick, next_due, run_loop
from .state import MirrorState, load, load_if_any, save
from .target import Target, open_target
from .update import run_update

__all__ = ["MirrorState", "Target", "Tick", "load", "load_if_any", "next_due", "open_target",
           "run_loop", "run_update", "save"]
