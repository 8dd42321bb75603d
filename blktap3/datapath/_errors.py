"""One place where the C data path's ``-errno`` return codes become ``OSError``."""

from __future__ import annotations

import os


def check(rc: int, what: str) -> None:
    """Raise ``OSError(errno, message)`` for a negative C return code."""
    if rc < 0:
        errno = -rc
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
