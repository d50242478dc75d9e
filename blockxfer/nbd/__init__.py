"""NBD export of a volume: the live volume read-write, each snapshot read-only.

`protocol` holds the wire formats, `negotiate` the fixed newstyle handshake,
`transmit` the transmission phase of one connection, `server` the listener and
its lifecycle, and `control` the JSON-lines socket other blockxfer commands
use while a server owns the volume (the FIFREEZE/FITHAW ioctls it may call are
in `blockxfer.drivers.freeze`, handed in by the serve command).
"""
