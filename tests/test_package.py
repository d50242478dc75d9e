"""The package as a user gets it: a wheel built from the tree, installed (not
editable) into a fresh virtual environment, run from a folder outside the tree.

The wheel must hold every package of the tree (a hand-kept list once left out
blockxfer.stream and blockxfer.transfer, and the installed `send`, `receive`,
`dump` and `restore` died with ModuleNotFoundError), and the installed command
must run the main job end to end. The fresh environment borrows the running
environment's third-party packages through a plain path in a .pth file (no
download, no compiling numpy): a path line adds that folder to sys.path but does
not run the .pth files in it, so the editable install of this tree stays out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "setup.py", "README.md", "blockxfer", "drivers"]
MiB = 1 << 20
EXTRAS = [("share/man/man1", "blockxfer.1", ["man"]),
          ("share/bash-completion/completions", "blockxfer", ["completion", "bash"]),
          ("share/zsh/site-functions", "_blockxfer", ["completion", "zsh"])]


def run(*argv: str | Path, cwd: Path, stdin: bytes | None = None,
        timeout: float = 300) -> bytes:
    r = subprocess.run([str(a) for a in argv], input=stdin, capture_output=True, cwd=cwd,
                       timeout=timeout, env=_clean_env())
    assert r.returncode == 0, f"{' '.join(map(str, argv))}: {r.stderr.decode()[-2000:]}"
    return r.stdout


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.pop("VIRTUAL_ENV", None)
    return env


def tree_packages() -> set[str]:
    """Every package of the source tree, by the name it installs under."""
    found = set()
    for top, name in (("blockxfer", "blockxfer"), ("drivers", "blockxfer.drivers")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the tree, so no build/ or egg-info lands in it."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        s = ROOT / name
        if s.is_dir():
            shutil.copytree(s, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif s.exists():
            shutil.copy2(s, src / name)
    for folder, name, argv in EXTRAS:              # what `make extras` does
        (src / folder).mkdir(parents=True)
        (src / folder / name).write_bytes(run(sys.executable, "-m", "blockxfer.cli", *argv,
                                              cwd=ROOT))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "dist", src,
        cwd=tmp)
    (whl,) = (tmp / "dist").glob("blockxfer-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel; returns its bin folder."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv.parent)
    purelib = Path(subprocess.check_output(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        text=True).strip())
    (purelib / "borrowed-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
        "--no-deps", "--no-index", wheel, cwd=venv.parent)
    return venv / "bin"


def test_wheel_holds_every_package_of_the_tree(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        inits = {n for n in z.namelist() if n.endswith("/__init__.py")}
    in_wheel = {n.removesuffix("/__init__.py").replace("/", ".") for n in inits}
    assert tree_packages() <= in_wheel, f"missing from the wheel: {tree_packages() - in_wheel}"
    assert {"blockxfer.stream", "blockxfer.transfer", "blockxfer.drivers"} <= in_wheel
    assert not any(n.startswith("drivers/") for n in inits), "drivers must install inside blockxfer"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "blockxfer/cli/topics/snapshot.txt" in names            # help topics: package data
    assert "blockxfer/data/systemd/blockxfer@.service" in names     # install-units writes it
    for folder, name, _ in EXTRAS:                                  # man page, completion
        assert any(n.endswith(f".data/data/{folder}/{name}") for n in names), name


def test_installed_command_runs_the_main_job(installed: Path,
                                             tmp_path: Path) -> None:
    bx = installed / "blockxfer"
    where = run(installed / "python", "-c", "import blockxfer; print(blockxfer.__file__)",
                cwd=tmp_path).decode().strip()
    assert where.startswith(str(installed.parent)), f"imported from {where}, not the venv"

    data = os.urandom(3 * MiB) + bytes(MiB) + os.urandom(MiB)
    run(bx, "init", "vol.img", "--size", "64M", cwd=tmp_path)
    run(bx, "write", "vol.img", stdin=data, cwd=tmp_path)
    run(bx, "snapshot", "vol.img@s1", cwd=tmp_path)
    run(bx, "send", "vol.img", "s1", "-o", "s1.stream", cwd=tmp_path)
    run(bx, "verify", "s1.stream", cwd=tmp_path)
    run(bx, "receive", "copy.img", "-i", "s1.stream", cwd=tmp_path)
    run(bx, "tape", "create", "t.vtape", "--capacity", "256M", cwd=tmp_path)
    run(bx, "dump", "vol.img", "s1", "--tape", "t.vtape", "--verify", cwd=tmp_path)
    run(bx, "restore", "restored.img", "--tape", "t.vtape", "--snapshot", "s1", cwd=tmp_path)
    for target in ("vol.img@s1", "copy.img@s1", "restored.img@s1"):
        got = run(bx, "read", target, "--length", str(len(data)), cwd=tmp_path)
        assert got == data, f"{target} differs from what was written"
    run(bx, "check", "restored.img", cwd=tmp_path)
    for folder, name, _ in EXTRAS:
        assert (installed.parent / folder / name).stat().st_size > 1000, name
    topic = run(bx, "help", "snapshot", cwd=tmp_path).decode()     # package data shipped
    assert "VOLUME@NAME" in topic and "june3-june1" in topic
    (tmp_path / "units").mkdir()
    run(bx, "install-units", "--dir", "units", cwd=tmp_path)          # systemd units shipped
    unit = (tmp_path / "units" / "blockxfer@.service").read_text()
    assert f"ExecStart={bx} serve %f" in unit
