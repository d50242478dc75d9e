"""`make demo` runs the main job end to end; it must keep working."""

from pathlib import Path

import pytest

from blockxfer.demo import run_demo


def test_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(str(tmp_path / "demo")) == 0
    out = capsys.readouterr().out
    assert "identical; check clean" in out
