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

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from blktap3.abi import SECTOR_SIZE
from blktap3.fsm.effects import OfferRing, ReadBackendInfo
from blktap3.fsm.events import (
    BackendInfoInvalid,
    BackendInfoRead,
    DeviceClose,
    DeviceFound,
    DeviceReconnect,
    DiskInfo,
    Event,
    RingOffered,
    RingOfferFailed,
)
from blktap3.fsm.frontend import FrontendVbd, backend_event
from blktap3.fsm.machine import SpecMachine
from blktap3.fsm.spec import MachineSpec, TransitionSpec, load_spec
from blktap3.fsm.xenbus_state import XenbusState

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


def trace(machine: SpecMachine, out: list[dict[str, Any]]) -> None:
    """Record each event `machine` handles as tapback's verbose log does (`step` with
    source and dest, `no step` with the state)."""
    handle: Callable[[Event], Any] = machine.handle

    def traced(event: Event) -> Any:
        before = str(machine.state)
        effects = handle(event)
        after = str(machine.state)
        out.append({"event": "step", "trigger": event.trigger, "source": before, "dest": after}
                   if after != before else
                   {"event": "no step", "trigger": event.trigger, "state": before})
        return effects

    machine.handle = traced  # type: ignore[method-assign]


@dataclass(frozen=True)
class GuestMove:
    """A move of the scenario's guest itself, in its place among the back-end states it
    saw: "close" (it wrote Closing or Closed: unplug, shutdown, suspend), "reconnect"
    (Initialising again: resume, migration, OVMF's hand-over), "ring_offer_failed" (it
    could not share its ring), "info_invalid" (what it read on Connected would not do)."""

    name: str


MOVES = {"close": DeviceClose(), "reconnect": DeviceReconnect()}


def frontend_lines(timeline: Sequence[str | GuestMove | None], max_ring_page_order: str = "3",
                   domid: int = 1) -> list[dict[str, Any]]:
    """The rows of the front-end machine that a reference blkfront (`FrontendVbd`, as the
    simulated guests run it) takes when fed what a scenario's guest lived through, in
    order: the back-end states it saw, and its own moves (a move the reference would not
    make in the state it is in is left out: the scripted guest's habits are the
    personality's). A back-end state the machine refuses ends the replay (the guest's
    verdict judges it)."""
    lines: list[dict[str, Any]] = []
    fe = FrontendVbd(domid)
    trace(fe, lines)
    pending: list[str | GuestMove | None] = list(timeline)

    def failed(name: str) -> bool:
        """Whether the guest's next move says that what was just asked failed."""
        move = next((m for m in pending if isinstance(m, GuestMove)), None)
        if move is None or move.name != name:
            return False
        pending.remove(move)
        return True

    def feed(event: Event) -> None:
        answers = [event]
        while answers:
            for effect in fe.handle(answers.pop(0)):
                if isinstance(effect, OfferRing):
                    answers.append(
                        RingOfferFailed("the guest could not share it")
                        if failed("ring_offer_failed")
                        else RingOffered(tuple(range(8, 8 + (1 << effect.order))), 5))
                elif isinstance(effect, ReadBackendInfo):
                    answers.append(
                        BackendInfoInvalid("the guest could not use them")
                        if failed("info_invalid")
                        else BackendInfoRead(DiskInfo(sectors=1 << 15,
                                                      sector_size=SECTOR_SIZE)))

    try:
        feed(DeviceFound(XenbusState.INITIALISING))
        while pending:
            item = pending.pop(0)
            if not isinstance(item, GuestMove):
                feed(backend_event(item, max_ring_page_order))
            elif item.name in MOVES:
                with contextlib.suppress(Exception):  # refused: the state is unchanged
                    feed(MOVES[item.name])
    except Exception:  # a refused state: the replay ends, the guest's verdict judges
        pass
    return lines
