"""Logging set-up of the tapback command (library modules only get loggers).

JSON lines by default (one object per line: timestamp, level, event, and the VBD's
`domid`, `devid`, `minor`, `pid` once known), a readable console format for a terminal.
Log lines of the standard `logging` module (e.g. from libraries) are routed through the
same renderer.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


def configure(fmt: str = "json", *, verbose: bool = False, stream: TextIO | None = None) -> None:
    """Configure structlog once for the process."""
    out = stream or sys.stderr
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=out.isatty()))
    level = logging.DEBUG if verbose else logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=out,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
