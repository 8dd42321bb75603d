"""A structlog logger that imports structlog only when a line is logged at a wanted level.

`import structlog` costs about 100 ms and 10 MB (it pulls in asyncio, and with it ssl and
OpenSSL), more than the rest of `tap-ctl list` together. Library modules on a command's
short path (the control client) log through `get_logger(name)`; the command says which
levels it wants with `set_threshold` before it works, and names the function that
configures structlog, run at the first line that passes. A leaf module: it imports
nothing of ours, so every room may use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# logging's level numbers, spelled here: `import logging` alone costs a command ~10 ms.
DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

_threshold = 0  # no command said anything: every line goes to structlog
_configure: Callable[[], None] | None = None


def set_threshold(level: int, configure: Callable[[], None] | None = None) -> None:
    """Drop lines below `level` without importing structlog; `configure` runs once,
    before the first line that passes reaches structlog."""
    global _threshold, _configure
    _threshold = level
    _configure = configure


def _configure_once() -> None:
    global _configure
    configure, _configure = _configure, None
    if configure is not None:
        configure()


class LazyLogger:
    """`debug`/`info`/`warning`/`error`/`exception` as structlog's, imported on demand."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: Any = None

    def _log(self, level: int, method: str, event: str, kw: dict[str, Any]) -> None:
        if level < _threshold:
            return
        if _configure is not None:  # whichever logger logs first, since the last command
            _configure_once()
        if self._logger is None:
            import structlog

            # structlog's lazy proxy: it reads the configuration in force at each call.
            self._logger = structlog.get_logger(self.name)
        getattr(self._logger, method)(event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        self._log(DEBUG, "debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log(INFO, "info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log(WARNING, "warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log(ERROR, "error", event, kw)

    def exception(self, event: str, **kw: Any) -> None:
        self._log(ERROR, "exception", event, kw)


def get_logger(name: str) -> LazyLogger:
    return LazyLogger(name)
