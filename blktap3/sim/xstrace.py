"""C xenstored's trace (`-T`): the requests it received and the connections it created.

Xen 4.17 writes `IN 0x55d0 20261206 01:23:46 WATCH (/x /x )` and `CREATE connection 0x55d0`;
Xen 4.18 and later prefix each line with its category (`io: `, `obj: `) and give an I/O
line the connection's domain: `io: IN 0x55d0 (d0) 20261206 01:23:46 WATCH (/x /x )`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

_REQUEST = re.compile(r"^(?:io: )?IN (0x[0-9a-f]+) (?:\(d\d+\) )?\S+ \S+ (\w+) ?(.*)$")
_CREATED = re.compile(r"^(?:obj: )?CREATE connection (0x[0-9a-f]+)")


class Request(NamedTuple):
    conn: str  # the connection's address in the daemon, e.g. "0x55d0c4f7a6d0"
    op: str  # e.g. "WATCH"
    args: str  # e.g. "(/x /x )"


def parse_request(line: str) -> Request | None:
    """The request a trace line records, None for any other line."""
    m = _REQUEST.match(line.rstrip("\n"))
    return Request(m.group(1), m.group(2), m.group(3)) if m else None


def requests(lines: Iterable[str]) -> list[Request]:
    return [r for r in map(parse_request, lines) if r is not None]


def created_connection(line: str) -> str | None:
    """The connection a trace line records the creation of, else None."""
    m = _CREATED.match(line)
    return m.group(1) if m else None
