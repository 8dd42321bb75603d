"""Fixtures of the xenbus unit tests: a fake xenstored on a socket in a temp directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from blktap3.xenbus import XenStore

from .fakexs import FakeXenstored


@pytest.fixture
def fake_xenstored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeXenstored]:
    # A short directory: AF_UNIX paths are limited to 108 bytes.
    server = FakeXenstored(str(tmp_path_factory.mktemp("xs") / "socket"))
    yield server
    server.close()


@pytest.fixture
def client(fake_xenstored: FakeXenstored) -> Iterator[XenStore]:
    xs = XenStore.open(fake_xenstored.path, timeout=2.0)
    yield xs
    xs.close()
