"""Every ``--flag`` the package's strings name (error messages, log lines, help, docstrings) is an option of
the ``apart-fast`` parser, unless it belongs to another tool (issue 21: an error message once told users to
pass ``--apart-no-layer-perturb``, which does not exist; the parser has ``--no-apart-layer-perturb``)."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import apart_fast
from apart_fast.cli import build_parser

# A whole flag: not a fragment that an f-string completes (``--apart-{name}``), nor ``--nproc_per_node``.
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w-])")
# Flags of other tools that the package quotes, and illustrations in docstrings.
FOREIGN = {
    "--benchmark-json", "--benchmark-min-rounds", "--benchmark-only",  # pytest-benchmark (bench kernels)
    "--no-build-isolation", "--no-deps",  # pip (the rebuild hint)
    "--porcelain", "--short", "--untracked-files",  # git (bench env's provenance)
    "--flag", "--no-flag", "--epoch",  # cli.py's docstrings: how argparse spells booleans and abbreviations
}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    out: set[str] = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _options(sub)
    return out


def quoted_flags(root: Path) -> dict[str, set[str]]:
    """Each flag in a string literal under ``root`` (f-strings' literal parts included), with the files quoting it."""
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in FLAG.findall(node.value):
                    found.setdefault(flag, set()).add(str(path.relative_to(root.parent)))
    return found


def test_every_flag_the_package_names_exists():
    found = quoted_flags(Path(apart_fast.__file__).parent)
    assert "--no-apart-layer-perturb" in found and "--apart-store-dtype" in found  # the scan sees the messages
    known = _options(build_parser())
    missing = {flag: sorted(paths) for flag, paths in found.items() if flag not in known | FOREIGN}
    assert not missing, f"the package names flags the parser lacks: {missing}"


def test_the_scan_catches_a_flag_that_does_not_exist(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text('def f(x):\n    raise ValueError(f"bad {x}; pass --apart-no-layer-perturb or --apart-{x}")\n')
    assert quoted_flags(pkg) == {"--apart-no-layer-perturb": {"pkg/m.py"}}
    assert "--apart-no-layer-perturb" not in _options(build_parser())
