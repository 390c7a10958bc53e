"""The data layer's exception type and its warning line."""

from __future__ import annotations

import sys


class DataError(ValueError):
    """A user-facing data problem; the message is one line naming the bad value and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def warn(message: str) -> None:
    """One warning line on stderr, as the command line prints them (``apart-fast: warning: ...``)."""
    from tqdm import tqdm

    tqdm.write(f"apart-fast: warning: {' '.join(str(message).split())}", file=sys.stderr)
