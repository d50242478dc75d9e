"""Parameter lists split between `make test` and `make test-slow`.

A kill or damage suite proves itself at many points; the default suite runs the
first few of them on every change and CI's slow run all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest


def first_fast(values: Iterable[Any], n: int) -> list[Any]:
    """`values` as parameters: the first `n` in make test, the rest marked slow.
    A tuple is one parameter set (several argument names), as parametrize takes it."""
    slow = pytest.mark.slow
    return [v if i < n else pytest.param(*v, marks=slow) if isinstance(v, tuple)
            else pytest.param(v, marks=slow) for i, v in enumerate(values)]
