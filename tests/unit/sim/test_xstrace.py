"""C xenstored's trace lines, in Xen 4.17's format and in 4.20's."""

from __future__ import annotations

import pytest

from blktap3.sim import xstrace

XEN_4_17 = """\
CREATE connection 0x55d0c4f7a6d0
IN 0x55d0c4f7a6d0 20261206 01:23:46 WATCH (/x /x )
OUT 0x55d0c4f7a6d0 20261206 01:23:46 WATCH (OK )
IN 0x55d0c4f7a6d0 20261206 01:23:46 TRANSACTION_START ( )
"""
XEN_4_20 = """\
obj: CREATE connection 0x55d0c4f7a6d0
io: IN 0x55d0c4f7a6d0 (d0) 20261206 01:23:46 WATCH (/x /x )
io: OUT(START) 0x55d0c4f7a6d0 (d0) 20261206 01:23:46 WATCH (OK )
io: IN 0x55d0c4f7a6d0 (d0) 20261206 01:23:46 TRANSACTION_START ( )
"""


@pytest.mark.parametrize("trace", [XEN_4_17, XEN_4_20], ids=["4.17", "4.20"])
def test_requests_and_connections_of_either_format(trace: str) -> None:
    lines = trace.splitlines()
    assert xstrace.requests(lines) == [
        xstrace.Request("0x55d0c4f7a6d0", "WATCH", "(/x /x )"),
        xstrace.Request("0x55d0c4f7a6d0", "TRANSACTION_START", "( )"),
    ]
    assert [xstrace.created_connection(line) for line in lines] == [
        "0x55d0c4f7a6d0", None, None, None]
