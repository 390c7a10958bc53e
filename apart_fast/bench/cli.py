"""``apart-fast bench``: placeholder until the benchmark issue lands."""

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=("kernels", "cost"))


def run(args: argparse.Namespace) -> int:
    raise ValueError(f"bench {args.what} is not built yet")
