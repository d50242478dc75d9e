"""The processes that own a volume or answer for it.

`service` is `blockxfer serve`: one process owns a volume (its CP timer, the NBD
exports, the control socket, scheduled jobs); `control` is the control socket
and its client, `commands` what it answers, `ops` the operations themselves
(shared with commands that open a volume here), `session` the "local or served"
view every command uses, `jobs` the schedules. `endpoint` answers the far side
of `ssh://` and `tls://` stream transports.
"""
