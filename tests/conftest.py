"""Suite-wide settings.

Hypothesis explores new random cases on a developer's machine; under CI (`CI` set) it
runs a fixed, derandomized set so that a landing is never decided by luck.
`HYPOTHESIS_PROFILE=explore` asks for a longer random search.

Entry points configure structlog globally (once per process, as they should); tests that
call them in-process must not leak that configuration, say a closed log file, into the
next test, so it is reset after every test.

A run started in the background by a script (`./run test &`) inherits SIGINT ignored,
and so would every command the tests start, which then keeps ignoring it as a Unix
program should: the tests that stop a command with ^C would wait for it in vain. The
suite takes SIGINT back (the commands it starts get the default disposition at exec).

The shared fixtures (run directory, simulated machine and host, tapback) and helpers
(waiting, processes, log files) live in `tests.support`, loaded here as a plugin.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import settings

pytest_plugins = ["tests.support.fixtures"]

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.register_profile("explore", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
