"""Static checks of a machine spec (run by `blktap3-fsm check` and by the tests).

- every state is reachable from the initial state;
- every non-final state has a way out (a transition to another state);
- every callback and condition the spec names is a method of the machine's class;
- (phases) no row spells out every state of a phase one by one where `@phase` says it
  (the loader already refuses unknown phases and states in no phase or in two);
- (back-end) every xenbus front-end state, plus `invalid` and `vanished`, is handled or
  explicitly ignored in every non-final back-end state; (front-end) likewise every
  back-end state: `render_table` prints that table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .machine import unbound_callbacks
from .spec import PHASE_PREFIX, SEPARATOR, MachineSpec, TransitionSpec
from .xenbus_state import XenbusState

# machine -> the trigger prefix of the other end's states it must handle everywhere
REQUIRED_TABLES = {"backend_vbd": "frontend_", "frontend_vbd": "backend_"}


def _ancestors(name: str) -> list[str]:
    parts = name.split(SEPARATOR)
    return [SEPARATOR.join(parts[:i]) for i in range(1, len(parts) + 1)]


def transitions_from(
    spec: MachineSpec, leaf: str, trigger: str | None = None
) -> list[TransitionSpec]:
    """Transitions that apply in `leaf` (declared on it or on a parent), in spec order."""
    names = set(_ancestors(leaf)) if spec.nested else {leaf}
    return [
        t for t in spec.transitions
        if names & set(t.sources) and (trigger is None or t.trigger == trigger)
    ]


def reachable(spec: MachineSpec) -> set[str]:
    """Leaf states reachable from the initial state."""
    start = spec.entry_leaf(spec.initial)
    seen, todo = {start}, [start]
    while todo:
        leaf = todo.pop()
        for t in transitions_from(spec, leaf):
            if t.dest is not None:
                nxt = spec.entry_leaf(t.dest)
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
    return seen


@dataclass(frozen=True)
class Cell:
    """How one (state, trigger) pair is treated: destinations, "ignore", or neither."""

    dests: tuple[str, ...]  # "" for a transition that stays (internal)
    ignored: bool

    @property
    def missing(self) -> bool:
        return not self.dests and not self.ignored

    def __str__(self) -> str:
        if self.missing:
            return "refused"  # raises the trigger's blame error (a gap where required)
        shown = [d if d else "(stay)" for d in self.dests]
        return " | ".join(shown + (["ignore"] if self.ignored else []))


def xenbus_table(spec: MachineSpec, prefix: str) -> tuple[list[str], dict[str, dict[str, Cell]]]:
    """Columns (triggers) and rows (non-final leaf state -> trigger -> Cell)."""
    columns = [f"{prefix}{s.trigger_suffix}" for s in XenbusState]
    columns += [f"{prefix}{extra}" for extra in ("invalid", "vanished")
                if f"{prefix}{extra}" in spec.triggers]
    rows: dict[str, dict[str, Cell]] = {}
    for leaf in spec.leaves():
        if leaf in spec.final:
            continue
        row = {}
        for col in columns:
            ts = transitions_from(spec, leaf, col)
            dests = tuple(t.dest or "" for t in ts if not t.ignored)
            row[col] = Cell(dests, any(t.ignored for t in ts))
        rows[leaf] = row
    return columns, rows


def render_table(spec: MachineSpec, prefix: str) -> str:
    """The table as aligned text: a row per state, a column per xenbus state of the peer
    (and, last, the state's phase when the machine declares phases)."""
    columns, rows = xenbus_table(spec, prefix)
    header = ["state", *(c.removeprefix(prefix) for c in columns)]
    body = [[leaf, *(str(row[c]) for c in columns)] for leaf, row in rows.items()]
    if spec.phases:
        header.append("phase")
        for line in body:
            phase = spec.phase_of(line[0])
            line.append(f"@{phase.name}" if phase else "")
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *body]]
    return "\n".join(lines)


def spelled_out_phases(spec: MachineSpec) -> list[str]:
    """Rows whose source lists every state of a phase (of two or more) one by one."""
    problems: list[str] = []
    seen: set[str] = set()
    for t in spec.transitions:
        if t.row in seen:  # an [[ignore]] of several triggers is one row
            continue
        seen.add(t.row)
        for phase in spec.phases:
            if len(phase.states) > 1 and set(phase.states) <= set(t.spelled):
                problems.append(f"{t.row} names every state of phase {phase.name!r} "
                                f"one by one: write {PHASE_PREFIX}{phase.name}")
    return problems


def check_spec(spec: MachineSpec, cls: type | None = None) -> list[str]:
    """Every problem found, as sentences; empty when the spec passes."""
    problems: list[str] = []
    reached = reachable(spec)
    for leaf in spec.leaves():
        if leaf not in reached:
            problems.append(f"state {leaf!r} is unreachable from {spec.initial!r}")
        if any(a in spec.final for a in _ancestors(leaf)):
            continue
        exits = [t for t in transitions_from(spec, leaf)
                 if t.dest is not None and spec.entry_leaf(t.dest) != leaf]
        if not exits:
            problems.append(f"non-final state {leaf!r} has no way out")
    for final in spec.final:
        if transitions_from(spec, spec.entry_leaf(final)):
            problems.append(f"final state {final!r} has transitions")
    problems += spelled_out_phases(spec)
    if cls is not None:
        problems += [f"callback {n!r} is not bound by {cls.__name__}"
                     for n in unbound_callbacks(spec, cls)]
    prefix = REQUIRED_TABLES.get(spec.name)
    if prefix is not None:
        columns, rows = xenbus_table(spec, prefix)
        for col in columns:
            if col not in spec.triggers:
                problems.append(f"trigger {col!r} is not declared")
        for leaf, row in rows.items():
            for col in columns:
                if col in spec.triggers and row[col].missing:
                    problems.append(f"{col!r} is neither handled nor ignored in {leaf!r}")
    return problems
