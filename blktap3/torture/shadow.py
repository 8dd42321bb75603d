"""What a guest may find in each sector of its disk, after writes that were answered
OKAY or ERROR, flushes that succeeded or failed, and power cuts.

Per sector: ``allowed``, the stamps a read may return now (a write answered OKAY leaves
one; a write answered ERROR may have been done, or partly, so it adds its stamp to the
old ones); ``durable``, what an acknowledged, completed FLUSH made stable; ``since``,
every stamp written (whatever its answer) since that FLUSH. A failed sync may lose any
of the writes since the last good one (``sync_failed``); a power cut may keep any of
them, in any combination (``after_cut``). ``ZEROS`` is an unwritten sector.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blktap3.sim.guestdrv import ZEROS


@dataclass
class Shadow:
    allowed: dict[int, set[int]] = field(default_factory=dict)
    durable: dict[int, set[int]] = field(default_factory=dict)
    since: dict[int, set[int]] = field(default_factory=dict)

    def may_read(self, sector: int) -> set[int]:
        return self.allowed.get(sector, {ZEROS})

    def must_survive(self, sector: int) -> set[int]:
        """What the sector may hold after a power cut."""
        return self.durable.get(sector, {ZEROS}) | self.since.get(sector, set())

    def write(self, sector: int, count: int, stamp: int, ok: bool) -> None:
        for s in range(sector, sector + count):
            self.since.setdefault(s, set()).add(stamp)
            if ok:
                self.allowed[s] = {stamp}
            else:
                self.allowed[s] = self.may_read(s) | {stamp}

    def flushed(self) -> None:
        """A FLUSH answered OKAY: everything allowed now is what stays."""
        for s in self.since:
            self.durable[s] = set(self.may_read(s))
        self.since.clear()

    def sync_failed(self) -> None:
        """A sync failed: any write since the last good FLUSH may be gone."""
        for s, stamps in self.since.items():
            self.allowed[s] = self.may_read(s) | self.durable.get(s, {ZEROS}) | stamps

    def after_cut(self) -> None:
        """After a power cut: a sector holds what it must survive with, nothing else."""
        for s in list(self.since):
            self.allowed[s] = self.must_survive(s)
            self.durable[s] = set(self.allowed[s])
        self.since.clear()
