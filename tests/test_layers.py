"""The package's layers import one way: engine -> methods -> step (an AST scan, so nothing is executed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "apart_fast"
FORBIDDEN = {"methods": ("apart_fast.engine",), "step": ("apart_fast.engine", "apart_fast.methods")}


def imported_modules(path: Path, root: Path = PKG) -> list[str]:
    """Absolute module names ``path`` (a file under the package folder ``root``) imports, relative ones resolved."""
    package = ["apart_fast", *path.relative_to(root).parent.parts]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            out += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return out


def violations(layer: str, root: Path = PKG) -> list[str]:
    """``file: module`` for every import in ``root/layer`` of a layer ``layer`` must not depend on."""
    bad = []
    for path in sorted((root / layer).rglob("*.py")):
        for mod in imported_modules(path, root):
            if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(root)}: {mod}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer: str) -> None:
    assert list((PKG / layer).glob("*.py")), f"no modules found in apart_fast/{layer}"
    assert violations(layer) == []


def test_scan_sees_every_import_form(tmp_path: Path) -> None:
    """The scanner catches absolute, from- and relative imports (so the test above can fail)."""
    src = "import apart_fast.engine.loop\nfrom apart_fast.engine import checkpoint\nfrom ..engine.faults import X\n"
    (tmp_path / "methods").mkdir()
    (tmp_path / "methods" / "probe.py").write_text(src)
    found = [v.split(": ")[1] for v in violations("methods", tmp_path)]
    assert "apart_fast.engine.loop" in found
    assert "apart_fast.engine.checkpoint" in found
    assert "apart_fast.engine.faults.X" in found
