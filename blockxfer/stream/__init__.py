"""Image streams: a self-describing, checksummed, resumable encoding of a storage image."""
