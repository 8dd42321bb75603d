"""Static checks of a machine spec (run by `blktap3-fsm check` and by the tests).

- every state is reachable from the initial state;
- every non-final state has a way out (a transition to another state);
- every callback and condition the spec names is a method of the machine's class;
- no dead rows: a state that `awaits` an answer has a row for each answer and none for
  any other trigger (nothing else can arrive there, see `blktap3.fsm.spec`);
- (phases) no row spells out every state of a phase one by one where `@phase` says it
  (the loader already refuses unknown phases and states in no phase or in two; a phase
  names its states that await no answer);
- (back-end) every xenbus front-end state, plus `invalid`, `unreadable` and `vanished`,
  is handled or explicitly ignored in every non-final back-end state that awaits no
  answer; so is every other event the observer or the owner may feed at any time
  (hotplug, online, removal, a tapdisk death, an image open), so that nothing tapback
  observes can be refused; (front-end) likewise every back-end state: `render_table`
  prints that table.
"""

from __future__ import annotations

from dataclasses import dataclass

from .machine import unbound_callbacks
from .spec import PHASE_PREFIX, SEPARATOR, MachineSpec, TransitionSpec
from .xenbus_state import XenbusState

# machine -> the trigger prefix of the other end's states it must handle everywhere
REQUIRED_TABLES = {"backend_vbd": "frontend_", "frontend_vbd": "backend_"}
# machine -> the other triggers that may arrive unasked in any state that awaits nothing
UNPROMPTED = {
    "backend_vbd": ("hotplug_connected", "hotplug_failed", "online", "offline",
                    "backend_removed", "tapdisk_died", "image_changed"),
}


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
    columns += [f"{prefix}{extra}" for extra in ("invalid", "unreadable", "vanished")
                if f"{prefix}{extra}" in spec.triggers]
    rows: dict[str, dict[str, Cell]] = {}
    awaiting = spec.awaiting()
    for leaf in spec.leaves():
        if leaf in spec.final or leaf in awaiting:
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
    awaiting = spec.awaiting()
    if awaiting:
        lines.append("not shown (an answer is awaited, nothing else arrives): "
                     + ", ".join(sorted(awaiting)))
    return "\n".join(lines)


def dead_rows(spec: MachineSpec) -> list[str]:
    """Rows that can never fire, and answers an awaiting state would refuse."""
    problems: list[str] = []
    for state, answers in spec.awaiting().items():
        for t in spec.transitions:
            if state in t.sources and t.trigger not in answers:
                kind = "ignore" if t.ignored else "row"
                problems.append(f"dead {kind}: {t.trigger!r} in {state!r}, which awaits only "
                                f"{list(answers)}")
        for answer in answers:
            if not transitions_from(spec, state, answer):
                problems.append(f"{state!r} awaits {answer!r} but neither handles nor "
                                "ignores it")
    return problems


def spelled_out_phases(spec: MachineSpec) -> list[str]:
    """Rows whose source lists every state of a phase (of two or more) one by one (those
    that await no answer: `@phase` names only them)."""
    problems: list[str] = []
    seen: set[str] = set()
    awaiting = spec.awaiting()
    for t in spec.transitions:
        if t.row in seen:  # an [[ignore]] of several triggers is one row
            continue
        seen.add(t.row)
        for phase in spec.phases:
            members = {s for s in phase.states if s not in awaiting}
            if len(members) > 1 and members <= set(t.spelled):
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
    problems += dead_rows(spec)
    problems += spelled_out_phases(spec)
    if cls is not None:
        problems += [f"callback {n!r} is not bound by {cls.__name__}"
                     for n in unbound_callbacks(spec, cls)]
    awaiting = spec.awaiting()
    for trigger in UNPROMPTED.get(spec.name, ()):
        for leaf in spec.leaves():
            if leaf in spec.final or leaf in awaiting:
                continue
            if not transitions_from(spec, leaf, trigger):
                problems.append(f"{trigger!r} is neither handled nor ignored in {leaf!r}")
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
