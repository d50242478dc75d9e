"""NBD export of a volume: the live volume read-write, each snapshot read-only.

`protocol` holds the wire formats, `negotiate` the fixed newstyle handshake,
`transmit` the transmission phase of one connection, `server` the listener and
its lifecycle, `control` the JSON-lines socket other blockxfer commands use
while a server owns the volume, and `freeze` the FIFREEZE/FITHAW ioctls.
"""
