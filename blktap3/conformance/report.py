"""The verdict table (scenario x step) and the JSON report of a conformance run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def side_by_side(runs: Mapping[str, Sequence[ScenarioResult]]) -> str:
    """The same scenarios judged on several back-ends: one line per scenario with each
    back-end's verdict (steps passed / steps), `differs` where the verdicts do, then for
    each back-end the steps where it differs from the specs (expected, observed)."""
    names = list(runs)
    by_scenario: dict[str, dict[str, ScenarioResult]] = {}
    for name, results in runs.items():
        for r in results:
            by_scenario.setdefault(r.scenario.name, {})[name] = r
    width = max((len(n) for n in by_scenario), default=8)
    cols = [max(len(n), 12) for n in names]
    head = "  ".join(f"{n:<{w}}" for n, w in zip(names, cols, strict=True))
    lines = [f"{'scenario':<{width}}  {'personality':<16} {head}"]
    for scenario, row in by_scenario.items():
        cells = []
        for n, w in zip(names, cols, strict=True):
            got = row.get(n)
            cell = "-" if got is None else (
                f"{MARK[got.verdict]} {sum(1 for s in got.steps if s.verdict == 'pass')}"
                f"/{len(got.steps)}")
            cells.append(f"{cell:<{w}}")
        verdicts = {r.verdict for r in row.values()}
        personality = next(iter(row.values())).scenario.personality
        lines.append(f"{scenario:<{width}}  {personality:<16} {'  '.join(cells)}"
                     f"{'  differs' if len(verdicts) > 1 else ''}".rstrip())
    totals = "  ".join(f"{f'{sum(r.ok for r in runs[n])}/{len(runs[n])} ok':<{w}}"
                       for n, w in zip(names, cols, strict=True))
    lines.append(f"{'':<{width}}  {'':<16} {totals}".rstrip())
    for name, results in runs.items():
        failing = [r for r in results if r.verdict != "pass"]
        lines.append("")
        lines.append(f"{name}: {len(failing)} of {len(results)} scenarios differ from the "
                     "specs" if failing else f"{name}: every scenario as the specs say")
        for r in failing:
            lines.append(f"  {r.scenario.name} ({MARK[r.verdict]})")
            for s in r.steps:
                if s.verdict in ("skip", "pass"):
                    continue
                lines.append(f"    {s.index:>5} {MARK[s.verdict]:<5} {s.label}")
                lines += [f"          {d}" for d in s.diff]
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
