"""The simulated guest as a process: ``python -m blktap3.sim.guestdrv`` (JSON lines)."""

from __future__ import annotations

from typing import Any

from blktap3.abi import BlkifProtocol

from ...datapath.lineproc import serve
from . import GuestRing


class GuestServer:
    def __init__(self) -> None:
        self.ring: GuestRing | None = None

    def _r(self) -> GuestRing:
        if self.ring is None:
            raise OSError(19, "no guest ring open")
        return self.ring

    def open(
        self,
        backend: int,
        order: int = 0,
        protocol: int = BlkifProtocol.NATIVE,
        data_slots: int = 0,
        slot_pages: int = 0,
        max_segs: int = 0,
        writable: bool = True,
    ) -> dict[str, Any]:
        layout = BlkifProtocol.from_wire(protocol)
        if layout is None:
            raise OSError(22, f"unknown ring protocol {protocol!r}")
        if self.ring is not None:
            self.ring.close()   # its pages and port go back: a reopen must not leak them
            self.ring = None
        self.ring = GuestRing(
            backend, order=order, protocol=layout, data_slots=data_slots,
            slot_pages=slot_pages, max_segs=max_segs, writable=writable,
        )
        return {"grefs": self.ring.grefs, "port": self.ring.port, "slots": self.ring.slots}

    def data_grefs(self, pages: int) -> list[int]:
        return [self._r().data_gref(p) for p in range(pages)]

    def indirect_grefs(self, slot: int) -> list[int]:
        """Ring request slot ``slot``'s own indirect pages (raw request ``slot`` uses them)."""
        r = self._r()
        grefs = (r.indirect_gref(slot, page) for page in range(8))
        return [g for g in grefs if g]

    def write(self, sector: int, data: str) -> int | None:
        return self._r().write(sector, bytes.fromhex(data))

    def read(self, sector: int, count: int) -> dict[str, Any]:
        status, data = self._r().read(sector, count)
        return {"status": status, "data": data.hex()}

    def submit(self, reqs: list[dict[str, Any]]) -> None:
        self._r().submit(reqs)

    def collect(self, n: int, timeout: float = 10.0) -> list[int | None]:
        return self._r().collect(n, timeout)

    def raw_ops(self, n: int) -> list[int | None]:
        return self._r().raw_ops(n)

    def batch(self, items: list[dict[str, Any]], timeout: float = 10.0) -> list[dict[str, Any]]:
        return self._r().batch(items, timeout)

    def run(self, **params: Any) -> dict[str, Any]:
        return self._r().run(**params)

    def overflow(self, extra: int = 0) -> None:
        self._r().overflow(extra)

    def revoke(self, page: int) -> int:
        return self._r().revoke(page)

    def revoke_indirect(self, slot: int, page: int) -> int:
        return self._r().revoke_indirect(slot, page)

    def hostile(self, **params: Any) -> dict[str, Any]:
        return self._r().hostile(**params)


def main() -> None:
    g = GuestServer()
    names = ("open", "data_grefs", "indirect_grefs", "write", "read", "submit", "collect",
             "raw_ops", "batch", "run", "overflow", "hostile", "revoke", "revoke_indirect")
    serve({name: getattr(g, name) for name in names})
    if g.ring is not None:
        g.ring.close()


if __name__ == "__main__":
    main()
