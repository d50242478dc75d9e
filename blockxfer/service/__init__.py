"""The processes that own a volume or answer for it: stream endpoints (and, next, the
service that owns a served volume)."""
