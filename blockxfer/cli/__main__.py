import sys

from blockxfer.cli.entry import run

sys.exit(run())
