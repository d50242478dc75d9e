"""blockxfer: a write-anywhere volume with bit-plane snapshots and image transfer."""

__version__ = "0.1.0"
