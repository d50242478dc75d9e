"""Package discovery that pyproject.toml cannot express on its own.

Every package under blockxfer/ is found, and every package under drivers/ is
installed as blockxfer.drivers.* (the package-dir mapping is in pyproject.toml):
a new package is never forgotten. tests/test_package.py checks the built wheel.
"""

import os

from setuptools import find_namespace_packages, find_packages, setup

DRIVERS = ["blockxfer.drivers"] + [f"blockxfer.drivers.{p}" for p in find_packages("drivers")]

# The man page and shell completion, when `make extras` generated them (they are
# built from the parser, so they need the installed tool; never committed).
EXTRAS = {"share/man/man1": "blockxfer.1", "share/bash-completion/completions": "blockxfer",
          "share/zsh/site-functions": "_blockxfer"}
DATA = [(d, [f"{d}/{f}"]) for d, f in EXTRAS.items() if os.path.exists(f"{d}/{f}")]

# namespace packages too: folders of package data (cli/topics, data/systemd) are
# packages to setuptools, which warns when they are left out
PACKAGES = find_namespace_packages(include=["blockxfer", "blockxfer.*"],
                                   exclude=["*.__pycache__"])

setup(packages=PACKAGES + DRIVERS, data_files=DATA)
