"""The tape interface the core sees: records, filemarks, spacing, positions.

`drivers/` implements it over the Linux `st` driver (`/dev/nstN`) and over a
virtual tape file with the same semantics; the core never imports a driver.
A tape is a sequence of records (one write = one record in variable-block
mode) separated into files by filemarks, ending at end of data (EOD).

End of medium never loses a record silently. `write_record` either writes the
whole record or raises:
  * `EarlyWarning` once, when the drive reports the early-warning zone: that
    record was NOT written. Later writes (a trailer, filemarks) succeed until
  * `EndOfMedium` at the physical end: that record was not written (or only
    `written` bytes of it, which a reader must treat as lost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from blockxfer.errors import DeviceError, EndOfMedium


class EarlyWarning(EndOfMedium):
    """The tape is in its early-warning zone; the record was not written."""

    written = 0


class EndOfData(DeviceError):
    """A read or space ran into end of data (nothing recorded beyond)."""


@dataclass(frozen=True, slots=True)
class TapeStatus:
    """What the drive reports; file and block are -1 when the driver lost count."""

    online: bool
    bot: bool                   # at beginning of tape
    eof: bool                   # just after a filemark
    eot: bool                   # past early warning
    eod: bool                   # at end of data
    write_protected: bool
    file: int
    block: int
    block_size: int             # 0: variable-block mode
    position: int | None = None  # logical object number (READ POSITION), when known

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


@runtime_checkable
class Tape(Protocol):
    path: str

    @property
    def can_locate(self) -> bool:
        """Probed: LOCATE / READ POSITION work on this drive (read-only)."""

    def write_record(self, data: bytes | bytearray | memoryview) -> None:
        """Write one record (a multiple of block_size in fixed mode)."""

    def read_record(self, size: int) -> bytes:
        """Read one record of at most `size` bytes; b"" at a filemark.

        Raises EndOfData at end of data. Read with exactly the record size:
        some drives (tgt) return wrong data for larger reads.
        """

    def write_filemarks(self, count: int = 1) -> None:
        """Write `count` filemarks (also a sync point: buffered data is on tape)."""

    def space_filemarks(self, count: int) -> None:
        """Forward (count > 0: end after the filemark) or back (< 0: end before it)."""

    def space_records(self, count: int) -> None:
        """Forward or back over records; crossing a filemark is an error."""

    def locate(self, position: int) -> None:
        """Go to a logical object number (records and filemarks count); needs can_locate."""

    def position(self) -> int:
        """The logical object number here; needs can_locate."""

    def rewind(self) -> None: ...

    def seek_eod(self) -> None:
        """Go to end of data, ready to append."""

    def status(self) -> TapeStatus: ...

    def load(self) -> None: ...

    def unload(self) -> None: ...

    def erase(self) -> None:
        """Erase from here to the end of the medium (from BOT: everything)."""

    def set_block_size(self, size: int) -> None:
        """0 selects variable-block mode."""

    def close(self) -> None: ...
