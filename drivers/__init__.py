"""Device adapters: the only code that knows ioctls, sysfs, udev and SCSI.

Installed as `blockxfer.drivers`. Each module implements one of the core's
small interfaces (`blockxfer.device.BlockDevice`, the tape interface) over an
open handle; nothing happens at import time.
"""
