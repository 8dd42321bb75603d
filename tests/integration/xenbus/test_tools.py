"""Debian's xenstore-utils see the tree we write (same daemon, XENSTORED_PATH)."""

from __future__ import annotations

import os
import subprocess

import pytest

from blktap3.sim.host import Host
from blktap3.xenbus import XenStore

from .conftest import Guest

pytestmark = pytest.mark.integration


def _tool(host: Host, *args: str) -> str:
    env = {**os.environ, **host.env()}
    return subprocess.run(list(args), env=env, capture_output=True, text=True, check=True,
                          timeout=10).stdout


def test_xenstore_ls_shows_the_vbd_tree(guest: Guest, xs: XenStore, host: Host) -> None:
    guest.xs.write(guest.vbd.frontend_key("ring-ref"), "8")
    out = _tool(host, "xenstore-ls", "-f", "-p", "/local/domain")
    lines = out.splitlines()
    assert any(line.startswith(f'{guest.vbd.frontend_key("ring-ref")} = "8"') and "n5" in line
               for line in lines), out
    assert any(line.startswith(f'{guest.vbd.backend_key("frontend")} = "{guest.vbd.frontend}"')
               for line in lines), out


def test_tool_writes_are_seen_by_our_client(xs: XenStore, host: Host) -> None:
    _tool(host, "xenstore-write", "/local/domain/0/from-tool", "hello")
    assert xs.read("/local/domain/0/from-tool") == "hello"
    assert _tool(host, "xenstore-read", "/local/domain/0/from-tool").strip() == "hello"
