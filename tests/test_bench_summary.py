"""`make bench` ends with one table of every figure against its goal, saved as
bench/results/latest.json; the run before moves to previous.json and its figures
show beside this run's."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench import common, summary


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(summary, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(common, "ROWS", [])
    return tmp_path / "results"


def fake_bench(monkeypatch: pytest.MonkeyPatch, name: str, ratio: float) -> None:
    def main() -> int:
        print(common.row("copy 1 GiB vs dd", 1.0, ratio, 1 << 30, goal=0.9))   # seconds
        print(common.row("snapshot", 12.5, goal=100, unit="ms", better="lower"))
        print(common.row("iops vs peer", 800.0, 1000.0, goal=0.8, unit="IOPS"))
        return 0
    monkeypatch.setitem(sys.modules, f"bench.{name}", types.SimpleNamespace(main=main))


def summary_of(out: str) -> str:
    return out[out.index("== summary =="):out.index("saved in")]


def test_row_records_and_prints() -> None:
    before = len(common.ROWS)
    line = common.row("read vs dd", 2.0, 1.0, 1 << 30, goal=0.9)
    r = common.ROWS[before]
    assert r.ratio == pytest.approx(0.5) and r.ok is False
    assert "BELOW GOAL" in line and "ratio  0.50" in line
    assert "ABOVE GOAL" in common.row("snap", 150.0, goal=100, unit="ms", better="lower")
    del common.ROWS[before:]


def test_summary_table_json_and_previous_run(results: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    fake_bench(monkeypatch, "bench_fake", 2.0)
    monkeypatch.setattr(sys, "argv", ["bench", "bench_fake"])
    assert bench_main.main() == 0
    table = summary_of(capsys.readouterr().out)
    assert "fake" in table and "copy 1 GiB vs dd" in table and "previous" not in table
    first = json.loads((results / "latest.json").read_text())
    rows = {r["name"]: r for r in first["rows"]}
    assert rows["copy 1 GiB vs dd"]["ratio"] == pytest.approx(2.0)
    assert rows["copy 1 GiB vs dd"]["ok"] is True and rows["copy 1 GiB vs dd"]["goal"] == 0.9
    assert rows["snapshot"]["ratio"] is None and rows["snapshot"]["ok"] is True
    assert rows["iops vs peer"]["ok"] is True and first["benches"] == ["bench_fake"]

    monkeypatch.setattr(common, "ROWS", [])
    fake_bench(monkeypatch, "bench_fake", 0.5)
    monkeypatch.setattr(sys, "argv", ["bench", "bench_fake"])
    bench_main.main()
    table = summary_of(capsys.readouterr().out)
    assert "previous" in table
    line = next(x for x in table.splitlines() if "copy 1 GiB vs dd" in x)
    assert line.split()[-4:] == ["0.50", ">=0.9", "BELOW", "2.00"]
    assert json.loads((results / "previous.json").read_text()) == first
    assert json.loads((results / "latest.json").read_text())["rows"][0]["ratio"] == 0.5


def test_a_failing_bench_is_listed_and_the_others_still_summarized(
        results: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> None:
        raise RuntimeError("boom")
    monkeypatch.setitem(sys.modules, "bench.bench_broken", types.SimpleNamespace(main=broken))
    fake_bench(monkeypatch, "bench_fake", 1.0)
    monkeypatch.setattr(sys, "argv", ["bench", "bench_broken", "bench_fake"])
    assert bench_main.main() == 1
    saved = json.loads((results / "latest.json").read_text())
    assert saved["failed"] == ["bench_broken"] and len(saved["rows"]) == 3
    assert "failed: bench_broken" in capsys.readouterr().out


def test_an_unreadable_previous_run_is_ignored(results: Path) -> None:
    results.mkdir()
    (results / "latest.json").write_text("{not json")
    assert "previous" not in summary.finish([], [], [])
    assert json.loads((results / "latest.json").read_text())["rows"] == []


def test_a_time_over_its_limit_is_above_not_below(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "ROWS", [])
    common.row("image on 1 TiB", 164.7, goal=100, unit="ms", better="lower")
    common.row("read vs dd", 2.0, 1.0, 1 << 30, goal=0.9)
    lines = summary.table(common.ROWS, None).splitlines()[2:]
    assert lines[0].split()[-1] == "ABOVE" and lines[1].split()[-1] == "BELOW"
