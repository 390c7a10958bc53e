"""Every ``--flag`` the package's messages and help texts name exists: collected from the string literals
of apart_fast/ (docstrings aside), each must be an option of the ``apart-fast`` parser or of the other
program the same string or list names (pip, torchrun, pytest, git)."""

from __future__ import annotations

import argparse
import ast
import functools
import re
from pathlib import Path

import pytest

from apart_fast.cli import build_parser
from apart_fast.engine import capture_check

PACKAGE = Path(__file__).resolve().parents[1] / "apart_fast"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*")
OTHER_PROGRAMS = re.compile(r"\b(pip|torchrun|pytest|git)\b")


@functools.cache
def _options() -> set[str]:
    """Every option string of the apart-fast parser and its subcommands, and of the modules run with python -m."""
    found: set[str] = set()

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            found.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    walk(capture_check.build_parser())
    return found


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module and its classes and functions (documentation, not messages)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def _quoted_flags() -> dict[str, list[str]]:
    """Flag -> where it is named ('file:line'), for the flags in string literals that no other program owns.

    A flag that ends in '-' is the literal start of an f-string flag (``f"--apart-{name}"``); it is kept and
    must prefix some option."""
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _docstrings(tree)
        owners: dict[int, str] = {}  # string node -> the whole literal it is part of (a list of arguments, an f-string)
        for node in ast.walk(tree):
            if isinstance(node, (ast.List, ast.Tuple, ast.JoinedStr)):
                text = " ".join(str(e.value) for e in ast.walk(node) if isinstance(e, ast.Constant) and isinstance(e.value, str))
                for e in ast.walk(node):
                    owners.setdefault(id(e), text)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in skip:
                continue
            for m in FLAG.finditer(node.value):
                context = owners.get(id(node), node.value)
                before = node.value[: m.start()] if id(node) not in owners else context[: context.find(m.group())]
                if OTHER_PROGRAMS.search(before):
                    continue
                found.setdefault(m.group(), []).append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


QUOTED = _quoted_flags()


@pytest.mark.parametrize("flag", sorted(QUOTED))
def test_every_flag_named_in_a_message_exists(flag):
    options = _options()
    ok = any(o.startswith(flag) for o in options) if flag.endswith("-") else flag in options
    assert ok, f"{flag} (named at {', '.join(QUOTED[flag])}) is not an apart-fast option"


def test_the_scan_finds_flags_and_tells_other_programs_apart():
    assert {"--resume", "--out", "--epochs", "--overwrite", "--max-faults", "--apart-"} <= set(QUOTED)
    for other in ("--no-build-isolation", "--nproc_per_node", "--porcelain", "--benchmark-only"):  # pip, torchrun, git, pytest
        assert other not in QUOTED
    assert "--pytest-arg" in QUOTED  # ours, though its help names pytest after it
