"""The single exception type of the data layer."""

from __future__ import annotations


class DataError(ValueError):
    """A user-facing data problem; the message is one line naming the bad value and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
