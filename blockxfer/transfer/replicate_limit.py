"""`--bwlimit`: an in-process token bucket on the stream's bytes.

The source writes through it (the destination asks for the limit in its pull):
each write takes tokens, refilled at `rate` bytes per second up to a burst of a
quarter second's worth (at least one frame), and waits when the bucket is empty.
The limit is on the stream's bytes, after compression, as rsync's --bwlimit is.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from blockxfer.transport.base import ByteSink

MIN_BURST = 1 << 20


class TokenBucket:
    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = max(MIN_BURST, rate / 4)
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._last = clock()

    def take(self, n: int) -> None:
        """Wait until `n` bytes may pass (a write larger than the burst waits for its
        whole size, so the long-run rate holds)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            self._sleep(-self._tokens / self.rate)


class Limited:
    """A ByteSink that passes writes on at no more than the bucket's rate."""

    def __init__(self, out: ByteSink, bucket: TokenBucket) -> None:
        self._out, self._bucket = out, bucket

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        self._bucket.take(len(data))
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()
