"""Imports point downwards (DESIGN.md, "The house, turn 2"), read from the source.

Every `import` and `from ... import` of every module under blockxfer/ and drivers/,
including imports inside functions, is checked against the layer table: a module may
import its own layer and the layers below it, never above. Only the wiring layers
(cli, service) may import the drivers, and techniques use transports only through
their protocols. Nothing is imported to find this out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# top to bottom; a module's layer is the first prefix that matches its name
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("blockxfer.cli", "blockxfer.demo", "blockxfer.__main__")),
    ("service", ("blockxfer.service", "blockxfer.remote", "blockxfer.handles")),
    ("techniques", ("blockxfer.transfer",)),
    # what is where: called by the techniques, knows only plain values and sqlite3
    ("catalog", ("blockxfer.catalog",)),
    ("transport", ("blockxfer.transport",)),
    ("stream", ("blockxfer.stream",)),
    ("image", ("blockxfer.image",)),
    ("volume", ("blockxfer.volume",)),
    ("export", ("blockxfer.nbd",)),
    ("devices", ("blockxfer.drivers",)),
    ("base", ("blockxfer.errors", "blockxfer.units", "blockxfer.checksum", "blockxfer.device",
              "blockxfer.outfile",
              "blockxfer.tape", "blockxfer.progress", "blockxfer")),
]
RANK = {name: len(LAYERS) - i for i, (name, _) in enumerate(LAYERS)}
MAY_IMPORT_DRIVERS = {"cli", "service", "devices"}
TRANSPORT_PROTOCOLS = ("blockxfer.transport", "blockxfer.transport.base")


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") or
               (p.startswith("blockxfer.cli") and module.startswith(p)) for p in prefixes):
            return name
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "drivers":
        parts = ["blockxfer", "drivers", *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module or ""
    # `from blockxfer import remote` imports the module blockxfer.remote
    return [f"{stem}.{a.name}" if stem in ("blockxfer", "blockxfer.drivers") else stem
            for a in node.names]


def imports() -> list[tuple[str, str, int]]:
    found = []
    files = [*ROOT.glob("blockxfer/**/*.py"), *ROOT.glob("drivers/**/*.py")]
    for path in files:
        module = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            for target in _targets(node, module, path.name == "__init__.py"):
                if target.startswith("blockxfer"):
                    found.append((module, target, getattr(node, "lineno", 0)))
    return found


def test_every_module_has_a_layer() -> None:
    for module, target, _ in imports():
        layer_of(module)
        layer_of(target)


def test_imports_point_downwards() -> None:
    bad = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)}), line {line}"
           for m, t, line in imports() if RANK[layer_of(t)] > RANK[layer_of(m)]]
    assert not bad, "\n".join(bad)


def test_only_the_wiring_imports_drivers() -> None:
    bad = [f"{m} imports {t}, line {line}" for m, t, line in imports()
           if layer_of(t) == "devices" and layer_of(m) not in MAY_IMPORT_DRIVERS]
    assert not bad, "\n".join(bad)


def test_techniques_use_transport_protocols_only() -> None:
    bad = [f"{m} imports {t}, line {line}" for m, t, line in imports()
           if layer_of(m) == "techniques" and layer_of(t) == "transport"
           and t not in TRANSPORT_PROTOCOLS]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(("upper", "lower"), [("cli", "service"), ("stream", "volume"),
                                              ("volume", "devices"), ("service", "export"),
                                              ("techniques", "catalog"),
                                              ("catalog", "transport")])
def test_layer_table_order(upper: str, lower: str) -> None:
    assert RANK[upper] > RANK[lower]


def test_the_catalog_takes_plain_values() -> None:
    """The catalog is told what was written where as plain values: it imports only
    itself and the base layer, so any technique (tape, file, store) may call it."""
    bad = [f"{m} imports {t}, line {line}" for m, t, line in imports()
           if layer_of(m) == "catalog" and layer_of(t) not in ("catalog", "base")]
    assert not bad, "\n".join(bad)
