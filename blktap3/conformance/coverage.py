"""Machine coverage: which rows of the back-end spec the scenarios made the back-end take.

The back-end under test logs each event its machine handled (`step`: trigger, source,
dest; `no step`: trigger, state, when run verbose). A row of `specs/backend_vbd.toml` is
covered when a logged event matches it: same trigger, its state among the row's sources,
and the state reached is the row's `dest` (or unchanged, for an internal row). A logged
event several rows could explain (rows that differ by condition) covers each of them.
Only a back-end that logs its machine (ours) has coverage; the report lists every row
no scenario reached, by trigger and source.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from blktap3.fsm.spec import MachineSpec, TransitionSpec, load_spec

MACHINE = "backend_vbd"


@dataclass(frozen=True)
class Coverage:
    machine: str
    rows: tuple[TransitionSpec, ...]
    covered: frozenset[int]  # indexes into rows

    @property
    def percent(self) -> float:
        return round(100.0 * len(self.covered) / len(self.rows), 1) if self.rows else 100.0

    def missed(self) -> list[str]:
        return [describe(r) for i, r in enumerate(self.rows) if i not in self.covered]

    def taken(self) -> list[str]:
        return [describe(r) for i, r in enumerate(self.rows) if i in self.covered]

    def as_dict(self) -> dict[str, Any]:
        return {"percent": self.percent, "rows": len(self.rows),
                "covered": len(self.covered), "missed": self.missed()}


def describe(row: TransitionSpec) -> str:
    source = ",".join(row.spelled or row.sources)
    cond = "".join(f" if {c}" for c in row.conditions) + "".join(
        f" unless {c}" for c in row.unless)
    return f"{row.trigger}: {source} -> {row.dest or '(internal)'}{cond}"


def rows_of(spec: MachineSpec) -> tuple[TransitionSpec, ...]:
    return tuple(t for t in spec.transitions if not t.ignored)


def covered_rows(rows: tuple[TransitionSpec, ...], lines: Iterable[dict[str, Any]]) -> set[int]:
    taken: set[tuple[str, str, str | None]] = set()
    for line in lines:
        trigger = str(line.get("trigger"))
        if line.get("event") == "step":
            taken.add((trigger, str(line.get("source")), str(line.get("dest"))))
        else:
            taken.add((trigger, str(line.get("state")), None))
    hit = set()
    for i, row in enumerate(rows):
        for source in row.sources:
            dest = row.dest if row.dest is not None and row.dest != source else None
            if (row.trigger, source, dest) in taken:
                hit.add(i)
    return hit


def coverage(lines: Iterable[dict[str, Any]], machine: str = MACHINE) -> Coverage:
    rows = rows_of(load_spec(machine))
    return Coverage(machine, rows, frozenset(covered_rows(rows, lines)))
