"""Debian's Python 3.11, this project and its PyPI dependencies, for dom0."""

from __future__ import annotations

from pathlib import Path

from .debs import Unpacked
from .initramfs import Initramfs


def add_to(image: Initramfs, pkgs: Unpacked, work: Path) -> None:
    raise NotImplementedError
