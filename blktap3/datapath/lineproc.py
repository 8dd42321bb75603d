"""A child process that answers JSON lines, and its client.

The data path and the simulated guest each run as their own process (each is a
different domain under xensim: its domid is fixed at exec time by the environment).
Tests and the benchmark drive them with one JSON object per line on stdin and read
one JSON reply per line on stdout: ``{"ok": ...}`` or ``{"error": errno, "message": ...}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

Handler = Callable[..., Any]


def serve(handlers: Mapping[str, Handler]) -> None:
    """Answer requests ``{"cmd": name, **kwargs}`` until stdin closes or "exit"."""
    out = sys.stdout
    # Replies only on the saved stdout; anything else printed goes to stderr.
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.pop("cmd")
        if cmd == "exit":
            out.write(json.dumps({"ok": None}) + "\n")
            out.flush()
            return
        try:
            reply: dict[str, Any] = {"ok": handlers[cmd](**req)}
        except OSError as exc:
            reply = {"error": exc.errno or 5, "message": str(exc)}
        except (KeyError, TypeError, ValueError) as exc:
            reply = {"error": 22, "message": f"{cmd}: {exc!r}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class LineProcess:
    """Client side: start the child, send commands, read replies (in order)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
                 stderr: IO[str] | None = None) -> None:
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=full_env,
            stderr=stderr,
            text=True,
            bufsize=1,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, cmd: str, **kwargs: Any) -> None:
        """Send a command without waiting (read its reply later with ``reply``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> Any:
        """The next reply; an error reply raises OSError(errno, message)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise OSError(32, f"child {self.proc.args!r} exited ({self.proc.poll()})")
        msg = json.loads(line)
        if "error" in msg:
            raise OSError(int(msg["error"]), str(msg["message"]))
        return msg["ok"]

    def call(self, cmd: str, **kwargs: Any) -> Any:
        self.send(cmd, **kwargs)
        return self.reply()

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to exit; kill it if it does not."""
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                # A dead child's pipe: nothing left to flush.
                with contextlib.suppress(OSError):
                    f.close()
