#!/usr/bin/env python3
"""Build the test bed's initramfs: busybox-static, a few kernel modules, /init.

Usage: mkinitramfs.py KERNEL_ROOT KVER INIT_SCRIPT OUT [MODULE ...]

KERNEL_ROOT is where the Debian kernel package was unpacked (it holds
lib/modules/KVER with a modules.dep made by `depmod -b`).  The named modules
and everything modules.dep says they need are copied in, and their load order
(dependencies first) is written to /etc/modules.order for /init to insmod.
Only stdlib and the host's `cpio` and `gzip` are used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def norm(name: str) -> str:
    return name.replace("-", "_")


def read_deps(moddir: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Map module name -> relative .ko path and relative path -> its dependencies."""
    by_name: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        base = os.path.basename(path)
        for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
            if base.endswith(ext):
                by_name[norm(base[: -len(ext)])] = path
                break
    return by_name, deps


def load_order(
    wanted: list[str], by_name: dict[str, str], deps: dict[str, list[str]], builtin: set[str]
) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        if path in seen:
            return
        seen.add(path)
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    missing = []
    for name in wanted:
        n = norm(name)
        if n in by_name:
            visit(by_name[n])
        elif n not in builtin:
            missing.append(name)
    if missing:
        sys.exit(f"mkinitramfs: modules not found in this kernel: {' '.join(missing)}")
    return order


def main() -> None:
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    kroot, kver, init_script, out = (Path(a) for a in sys.argv[1:5])
    wanted = sys.argv[5:]
    moddir = kroot / "lib" / "modules" / str(kver)
    by_name, deps = read_deps(moddir)
    builtin = set()
    if (moddir / "modules.builtin").exists():
        for line in (moddir / "modules.builtin").read_text().splitlines():
            builtin.add(norm(os.path.basename(line).split(".ko")[0]))
    order = load_order(wanted, by_name, deps, builtin)

    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory(prefix="tb-initramfs.") as tmp:
        root = Path(tmp)
        for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "host", "tmp", "run", "lib/modules"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        applets = subprocess.run(
            [str(root / "bin" / "busybox"), "--list"], check=True, capture_output=True, text=True
        ).stdout.split()
        for a in applets:
            link = root / "bin" / a
            if not link.exists():
                link.symlink_to("busybox")
        (root / "sbin" / "init").symlink_to("../bin/busybox")
        names = []
        for rel in order:
            dst = root / "lib" / "modules" / os.path.basename(rel)
            shutil.copy2(moddir / rel, dst)
            names.append(os.path.basename(rel))
        (root / "etc" / "modules.order").write_text("\n".join(names) + "\n")
        (root / "etc" / "kver").write_text(f"{kver}\n")
        shutil.copy2(init_script, root / "init")
        os.chmod(root / "init", 0o755)

        files = subprocess.run(
            ["find", "."], cwd=root, check=True, capture_output=True, text=True
        ).stdout
        tmp_out = Path(str(out) + ".tmp")
        with open(tmp_out, "wb") as f:
            cpio = subprocess.Popen(
                ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
                cwd=root,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            gz = subprocess.Popen(["gzip", "-1"], stdin=cpio.stdout, stdout=f)
            assert cpio.stdin is not None and cpio.stdout is not None
            cpio.stdout.close()
            cpio.stdin.write(files.encode())
            cpio.stdin.close()
            if cpio.wait() or gz.wait():
                sys.exit("mkinitramfs: cpio/gzip failed")
        tmp_out.rename(out)
    print(f"initramfs: {out} ({out.stat().st_size // 1024} KiB, {len(order)} modules)")


if __name__ == "__main__":
    main()
