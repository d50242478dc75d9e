"""Transfer techniques built on streams: tape dump and restore (more to come)."""
