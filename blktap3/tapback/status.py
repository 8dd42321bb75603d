"""tapback's live state for other tools: one JSON file, replaced atomically.

The diagram tool (`blktap3-diagram`) draws a running VBD's machine with its current
state marked from this file.  The contract, agreed with its reader:

    {"pid": <tapback pid>,
     "vbds": [{"domid": 1, "devid": 51712, "machine": "backend_vbd",
               "state": "connected", "published": 4}, ...]}

`state` is the machine's state (a spec state name), `published` the xenbus state it last
published (null: none yet), `machine` the spec's name.  The file is written at start,
after each worker step that changed a VBD's state or publication, when a VBD is
forgotten, and removed on a clean exit.  Each write goes to a temporary file in the same
directory, then `os.replace`: a reader never sees half a file.  Writes are serialized
by one lock (a write is a few hundred bytes, and happens only on a state change).
Default path: `<control-dir>/tapback.<backend-kind>.status.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

VbdKey = tuple[int, int]


def default_path(control_root: Path, backend_kind: str) -> Path:
    return control_root / f"tapback.{backend_kind}.status.json"


@dataclass(frozen=True)
class VbdStatus:
    machine: str
    state: str
    published: int | None


class StatusFile:
    """The status file of one tapback (see the module docstring)."""

    def __init__(self, path: Path, pid: int | None = None) -> None:
        self.path = path
        self.pid = os.getpid() if pid is None else pid
        self._vbds: dict[VbdKey, VbdStatus] = {}
        self._lock = threading.Lock()
        self._failed = False  # a write failed: said once in the log

    def start(self) -> None:
        with self._lock:
            with contextlib.suppress(FileExistsError):
                self.path.parent.mkdir(mode=0o700, parents=True)
            self._write()

    def update(self, key: VbdKey, status: VbdStatus) -> None:
        with self._lock:
            if self._vbds.get(key) == status:
                return
            self._vbds[key] = status
            self._write()

    def forget(self, key: VbdKey) -> None:
        with self._lock:
            if self._vbds.pop(key, None) is not None:
                self._write()

    def remove(self) -> None:
        with self._lock:
            self._vbds.clear()
            self.path.unlink(missing_ok=True)

    def content(self) -> dict[str, object]:
        vbds = [{"domid": domid, "devid": devid, "machine": s.machine, "state": s.state,
                 "published": s.published}
                for (domid, devid), s in sorted(self._vbds.items())]
        return {"pid": self.pid, "vbds": vbds}

    def _write(self) -> None:
        data = json.dumps(self.content(), separators=(",", ":")).encode()
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, 0o644)  # for tools that do not run as root
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("status file not written", path=str(self.path), error=str(exc))
