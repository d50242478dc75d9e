"""Resume tickets: what lets a source trust a destination's resume token.

A resume token is written by the destination (the VBNs it already holds), so a
source must not believe what it names (OpenZFS issue 14153: a crafted token
made a sender send other data). When a source starts a stream it gives the
destination a ticket: an HMAC-SHA256, under a secret kept in the source
volume's local properties (`replicate.secret`, never replicated), of the
volume, the destination's name, the stream id, the image expression and the
guids of its top and base. A resume names all of them again with the ticket;
the source recomputes the HMAC, checks that the token is for that stream, that
both snapshots still exist with those guids, and that the token's blocks lie in
the image (`stream.send.parse_token`). Anything else is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

from blockxfer.errors import DeviceError
from blockxfer.volume import Volume

SECRET = "replicate.secret"


class ResumeRefused(DeviceError):
    """A resume whose ticket, stream or token does not hold up, or a destination name
    another identity registered (exit 4, as every authentication refusal)."""


def secret(vol: Volume, *, create: bool) -> bytes | None:
    """The volume's ticket secret (made on first use when `create`)."""
    key = vol.get_property(SECRET)
    if key is None and create:
        key = os.urandom(32)
        vol.set_property(SECRET, key)
    return key


def ticket(key: bytes, volume_uuid: bytes, dest: str, stream_id: bytes, expression: str,
           top_guid: bytes, base_guid: bytes | None) -> str:
    msg = json.dumps([volume_uuid.hex(), dest, stream_id.hex(), expression, top_guid.hex(),
                      base_guid.hex() if base_guid else None]).encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def valid(key: bytes | None, given: object, volume_uuid: bytes, dest: str, stream_id: bytes,
          expression: str, top_guid: bytes, base_guid: bytes | None) -> bool:
    if key is None or not isinstance(given, str):
        return False
    want = ticket(key, volume_uuid, dest, stream_id, expression, top_guid, base_guid)
    return hmac.compare_digest(want, given)
