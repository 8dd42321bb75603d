"""The verdict table (scenario x step) and the JSON report of a conformance run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .coverage import Coverage
from .runner import ScenarioResult

MARK = {"pass": "ok", "FAIL": "FAIL", "xfail": "xfail", "XPASS": "XPASS", "skip": "-"}


def table(results: Sequence[ScenarioResult], *, steps: bool = True) -> str:
    """One line per scenario (name, personality, back-end, verdict), then, under each
    that did not pass, its steps with what was expected and what was observed."""
    width = max((len(r.scenario.name) for r in results), default=8)
    lines = [f"{'scenario':<{width}}  {'personality':<16} {'backend':<28} {'xs':<5} "
             f"{'steps':>5}  verdict"]
    for r in results:
        n_ok = sum(1 for s in r.steps if s.verdict == "pass")
        lines.append(f"{r.scenario.name:<{width}}  {r.scenario.personality:<16} "
                     f"{r.backend:<28} {r.xenstored:<5} {n_ok:>2}/{len(r.steps):<2}  "
                     f"{MARK[r.verdict]}")
        if r.verdict in ("xfail", "XPASS") and r.scenario.xfail:
            lines.append(f"    expected to fail: {r.scenario.xfail}")
        if steps and r.verdict != "pass":
            for s in r.steps:  # the steps that did not pass (the rest: the counts)
                if s.verdict in ("skip", "pass"):
                    continue
                lines.append(f"    {s.index:>5} {MARK[s.verdict]:<5} {s.label}")
                for d in s.diff:
                    lines.append(f"          {d}")
    return "\n".join(lines)


def coverage_text(cov: Coverage, by: str = "scenario") -> str:
    lines = [f"coverage of {cov.machine}: {len(cov.covered)}/{len(cov.rows)} rows "
             f"({cov.percent} %)"]
    missed = cov.missed()
    if missed:
        lines.append(f"  rows no {by} reached:")
        lines += [f"    {m}" for m in missed]
    return "\n".join(lines)


def as_json(results: Sequence[ScenarioResult], covs: Sequence[Coverage]) -> dict[str, Any]:
    return {"scenarios": [r.as_dict() for r in results],
            "coverage": {c.machine: c.percent for c in covs},
            "coverage_detail": {c.machine: c.as_dict() for c in covs},
            "ok": all(r.ok for r in results)}
