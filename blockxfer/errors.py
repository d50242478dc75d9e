"""The one exception tree. Each class carries the exit code the CLI returns.

Every error raised on purpose is a BlockxferError whose message is one line for
the operator: what is wrong and what to do. Anything else is a bug and keeps
its traceback.
"""


class BlockxferError(Exception):
    """Base of every error raised on purpose; the message is for the operator."""

    exit_code = 1


class UsageError(BlockxferError):
    """The command line or an argument is wrong."""

    exit_code = 2


class FormatError(BlockxferError):
    """Bad magic, version, checksum or truncation in an on-disk or wire structure."""

    exit_code = 3


class DamagedBlock(FormatError):
    """A volume block whose bytes do not match the checksum its pointer keeps."""


class ExpressionError(UsageError):
    """An image expression does not parse or names something that is not there."""


class DeviceError(BlockxferError):
    """A device or file could not be used."""

    exit_code = 4


class DeviceBusy(DeviceError):
    """The device is mounted, held, part of an array, or locked by another process."""


class EndOfMedium(DeviceError):
    """A tape reached its end of medium."""


class MediumError(DeviceError):
    """An I/O error reading or writing the medium."""


class WriteProtected(DeviceError):
    """The medium refuses writes."""


class VolumeError(BlockxferError):
    """The volume cannot do what was asked."""

    exit_code = 5


class VolumeFull(VolumeError):
    """No free block is left (ENOSPC); what was committed stays readable."""


class NotFound(VolumeError):
    """A snapshot, pointer or image that was named does not exist."""


class AlreadyExists(VolumeError):
    """A snapshot or pointer of that name already exists."""


class StreamError(FormatError):
    """An image stream is damaged, truncated or meant for another target."""


def error_to_dict(e: BlockxferError) -> dict[str, object]:
    """An error as it travels between processes (control socket, stream endpoints)."""
    return {"type": type(e).__name__, "message": str(e), "exit_code": e.exit_code}


def error_from_dict(err: dict[str, object], default: str = "the far side failed",
                    prefix: str = "") -> BlockxferError:
    """The error `error_to_dict` described, as the same class when it is one of ours."""
    cls = globals().get(str(err.get("type")))
    if not (isinstance(cls, type) and issubclass(cls, BlockxferError)):
        cls = BlockxferError
    exc = cls(prefix + str(err.get("message") or default))
    code = err.get("exit_code")
    if isinstance(code, int):
        exc.exit_code = code
    return exc
