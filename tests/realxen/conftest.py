"""The real-Xen rig's marker: its tests boot Xen under QEMU and run only on request."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "realxen: boots a real Xen host under QEMU (set BLKTAP3_REALXEN=1)"
    )
