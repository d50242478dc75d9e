"""The one table from blockxfer errors to NBD error values.

The transmission phase calls `nbd_error(exc)` for every exception a volume call
raises; the most specific class in the table wins (the exception's MRO is
walked), anything unknown is EIO.
"""

from __future__ import annotations

from blockxfer import errors

from . import protocol as p

_BY_CLASS: dict[type[BaseException], int] = {
    errors.VolumeFull: p.ENOSPC,
    errors.EndOfMedium: p.ENOSPC,
    errors.WriteProtected: p.EPERM,
    errors.UsageError: p.EINVAL,
    errors.NotFound: p.EIO,          # snapshot destroyed while exported
    errors.MediumError: p.EIO,
    errors.DeviceError: p.EIO,
    errors.FormatError: p.EIO,
    errors.VolumeError: p.EIO,
    errors.BlockxferError: p.EIO,
    ValueError: p.EINVAL,
    MemoryError: p.ENOMEM,
}


def nbd_error(exc: BaseException) -> int:
    for cls in type(exc).__mro__:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    return p.EIO
