import sys

from blockxfer.cli.app import main

sys.exit(main())
