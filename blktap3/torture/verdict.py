"""What a torture run found: its figures and every failure, printed and as JSON."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Budget:
    """How long a run goes: ``count`` iterations, or until ``seconds`` have passed."""

    count: int | None
    seconds: float | None
    t0: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, count: int | None, seconds: float | None, default: int) -> Budget:
        """``count`` or ``seconds`` as given; ``default`` iterations when neither is."""
        return cls(default if count is None and seconds is None else count, seconds)

    def spent(self, done: int) -> bool:
        """Whether a run that has done ``done`` iterations stops here."""
        if self.count is not None and done >= self.count:
            return True
        return self.seconds is not None and self.elapsed() >= self.seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


@dataclass
class Verdict:
    """The figures of one run and what went wrong (nothing, for a pass)."""

    name: str
    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, what: str) -> None:
        self.failures.append(what)

    def expect_zero(self, **counts: int) -> None:
        """Each named count must be 0: anything else is a failure saying how many."""
        for what, n in counts.items():
            if n:
                self.fail(f"{what}: {n}")

    def text(self) -> str:
        lines = [f"{self.name}: {'ok' if self.ok else 'FAILED'}"]
        lines += [f"  {k}: {_fmt(v)}" for k, v in self.figures.items()]
        lines += [f"  failure: {f}" for f in self.failures]
        return "\n".join(lines)

    def write_json(self, path: Path) -> None:
        doc = {"name": self.name, "ok": self.ok, "figures": self.figures,
               "failures": self.failures}
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)
