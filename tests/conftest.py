"""Shared fixtures: skips say what is missing."""

from __future__ import annotations

import os

import pytest


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices)")


@pytest.fixture
def root() -> None:
    need_root()
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("needs /dev/loop-control")
