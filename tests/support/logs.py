"""The JSON log lines a child process wrote (tapback's `--log-file`, a tapdisk's log).

Log lines of code running in the test process are captured with
`structlog.testing.capture_logs()`; a child process can only be read through its file.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any


def log_events(path: str | os.PathLike[str], event: str | None = None) -> list[dict[str, Any]]:
    """The JSON lines of the log file so far (lines that are not JSON, e.g. a traceback on
    stderr, are skipped), only those whose `event` is `event` when given."""
    lines = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict) and (event is None or entry.get("event") == event):
                    lines.append(entry)
    return lines
