"""A catalog of what is where: every image written to tape, file or object store,
in SQLite (docs/catalog.md). `hooks` is what the transfer layer calls; `records`,
`query` and `pools` are what the `catalog` commands use."""
