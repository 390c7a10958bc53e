"""``apart-fast reproduce``: placeholder until the study issue lands."""

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("cpu", "paper"), default="cpu")


def run(args: argparse.Namespace) -> int:
    raise ValueError("reproduce is not built yet")
