"""What a torture run found: its figures and every failure, printed and as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
