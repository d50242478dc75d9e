"""Files the package ships that are not Python: the systemd units under systemd/
(`blockxfer install-units` writes them where systemd reads them)."""
