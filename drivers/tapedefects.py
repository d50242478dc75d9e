"""Probe a drive for known SSC emulation defects that no adapter can hide.

`probe_defects` writes a few records and filemarks from BOT (scratch tapes
only), spaces over them and reads back, and returns the defects it saw, each
with a reason naming it for the operator (and for skipped tests). It checks
what the drive does, never who made it: a fixed tgt passes, and so does the
virtual tape. Defects the adapter works around (no residual at end of data,
EOM sense on a read at EOD) are not listed here; `drivers.st` handles them.
It reads with exactly the record size (research §2.7: larger reads return
wrong data on tgt < 1.0.94).
"""

from __future__ import annotations

from blockxfer.errors import MediumError
from blockxfer.tape import Tape

BSF_OVERSHOOT = "bsf-overshoot"
FSR_CROSSES_FILEMARK = "fsr-crosses-filemark"

REASONS = {
    BSF_OVERSHOOT: "drive defect: SPACE filemarks in reverse (MTBSF) stops one record too far, "
                   "before the last record instead of before the filemark "
                   "(tgt <= 1.0.97 SSC emulation, research §2.6 item 5)",
    FSR_CROSSES_FILEMARK: "drive defect: SPACE blocks (MTFSR/MTBSR) counts filemarks as records "
                          "and crosses them without FILEMARK sense "
                          "(tgt <= 1.0.97 SSC emulation, research §2.6 item 4)",
}

_SIZE = 4096


def _record(n: int) -> bytes:
    return (f"probe record {n};".encode() * _SIZE)[:_SIZE]


def probe_defects(tape: Tape) -> dict[str, str]:
    """Write A0 A1 FM B0 FM from BOT, then check BSF and FSR; defect name -> reason."""
    tape.rewind()
    for n in range(2):
        tape.write_record(_record(n))
    tape.write_filemarks(1)
    tape.write_record(_record(2))
    tape.write_filemarks(1)
    found = {}
    tape.space_filemarks(-1)            # before the second filemark, after B0
    if tape.read_record(_SIZE) != b"":
        found[BSF_OVERSHOOT] = REASONS[BSF_OVERSHOOT]
    tape.rewind()
    if not _fsr_stops_at_filemark(tape):
        found[FSR_CROSSES_FILEMARK] = REASONS[FSR_CROSSES_FILEMARK]
    tape.rewind()
    return found


def _fsr_stops_at_filemark(tape: Tape) -> bool:
    try:
        tape.space_records(3)           # A0, A1, then the filemark: must stop there
    except MediumError:
        return True
    return False
