"""Package discovery that pyproject.toml cannot express on its own.

Every package under blockxfer/ is found, and every package under drivers/ is
installed as blockxfer.drivers.* (the package-dir mapping is in pyproject.toml):
a new package is never forgotten. tests/test_package.py checks the built wheel.
"""

from setuptools import find_packages, setup

DRIVERS = ["blockxfer.drivers"] + [f"blockxfer.drivers.{p}" for p in find_packages("drivers")]

setup(packages=find_packages(include=["blockxfer", "blockxfer.*"]) + DRIVERS)
