"""Test support in one place: waiting, processes, log files, the simulated host.

- `wait_until(predicate, timeout, what)`: poll a condition; a timeout raises
  `WaitTimeout` naming what was awaited (and the last value seen).
- `processes`: is a pid alive (our own zombies reaped), kill and reap, assert that no
  process is left, the tapdisks of a control directory.
- `logs.log_events(path, event)`: the JSON lines a child process (tapback, tapdisk)
  wrote to its log file. In-process log lines are pinned with
  `structlog.testing.capture_logs()` instead.
- `fixtures` (a pytest plugin, loaded by tests/conftest.py): `run_dir`, `machine`,
  `xenstored_kind`, `host` (one per xenstored kind), `xs`, `tapback`.
- `sim.guest_xenstore`: a guest domain's own XenStore connection over its ring page.
- `nbd.NbdClient`: a small NBD client written from the protocol document (not from our
  codec), for the tapdisk's NBD export.

Rules: a test waits on the real condition (an event, a counter, a key, a process
state), never on a sleep; a `time.sleep` left in a test is the behaviour under test
and says so in a comment.
"""

from __future__ import annotations

from .logs import log_events
from .processes import (
    alive,
    assert_no_process_left,
    kill_and_reap,
    kill_tapdisks,
    signal_midway,
    tapdisk_pids,
    wait_gone,
)
from .waiting import WaitTimeout, wait_until

__all__ = [
    "WaitTimeout",
    "alive",
    "assert_no_process_left",
    "kill_and_reap",
    "kill_tapdisks",
    "log_events",
    "signal_midway",
    "tapdisk_pids",
    "wait_gone",
    "wait_until",
]
