"""NBD export of a volume: the live volume read-write, each snapshot read-only.

`protocol` holds the wire formats, `negotiate` the fixed newstyle handshake,
`transmit` the transmission phase of one connection (`rxbuf` its receive
buffer, `commands` what each command does, `readpipe` its READs in flight),
and `server` the listener and its lifecycle. This package speaks only NBD: the
process that owns a served volume, with its control socket, is
`blockxfer.service`.
"""
