"""The `serve --tls` modes, apart from `tls` so that the command line's parser,
which every command builds, names them without loading ssl."""

from __future__ import annotations

from typing import Literal

Mode = Literal["off", "on", "require"]
MODES: tuple[Mode, ...] = ("off", "on", "require")
