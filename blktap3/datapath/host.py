"""A minimal dom0 host of rings, as a child process: ``python -m blktap3.datapath.host``.

Stands in for the tapdisk in the data-path tests (the benchmark drives the real
tapdisk, see ``blktap3.tools.bench_ring``): it opens images and
serves rings through the same facade the tapdisk uses, driven by JSON lines (see
``lineproc``). Images and rings are named by the caller.
"""

from __future__ import annotations

import os
from typing import Any

from blktap3.abi import BlkifProtocol

from .image import Image
from .lineproc import serve
from .ring import Ring


class Host:
    def __init__(self) -> None:
        self.images: dict[str, Image] = {}
        self.rings: dict[str, Ring] = {}

    def open(
        self, name: str, driver: str, path: str, readonly: bool = False, o_direct: bool = True
    ) -> dict[str, Any]:
        img = Image.open(driver, path, readonly=readonly, o_direct=o_direct)
        self.images[name] = img
        return dict(img.info.__dict__)

    def close_image(self, name: str) -> None:
        self.images.pop(name).close()

    def connect(self, name: str, image: str, protocol: int = BlkifProtocol.NATIVE,
                **kwargs: Any) -> None:
        layout = BlkifProtocol.from_wire(protocol)
        if layout is None:
            raise OSError(22, f"unknown ring protocol {protocol!r}")
        self.rings[name] = Ring.connect(self.images[image], protocol=layout, **kwargs)

    def pause(self, name: str, timeout: float = 30.0) -> None:
        self.rings[name].pause(timeout)

    def resume(self, name: str, image: str | None = None) -> None:
        self.rings[name].resume(self.images[image] if image else None)

    def disconnect(self, name: str, timeout: float = 30.0) -> None:
        self.rings.pop(name).disconnect(timeout)

    def stats(self, name: str) -> dict[str, Any]:
        return self.rings[name].stats()

    def io_stats(self, name: str) -> dict[str, Any]:
        return self.rings[name].io_stats()

    def req_timeout(self, name: str, seconds: int) -> None:
        self.rings[name].set_req_timeout(seconds)

    def inject_eagain(self, name: str, count: int) -> None:
        self.rings[name].inject_eagain(count)

    def cpu(self) -> dict[str, float]:
        """This process's CPU seconds: the benchmark's cost per request."""
        t = os.times()
        return {"user": t.user, "system": t.system}


def main() -> None:
    host = Host()
    serve({
        "open": host.open,
        "close_image": host.close_image,
        "connect": host.connect,
        "pause": host.pause,
        "resume": host.resume,
        "disconnect": host.disconnect,
        "stats": host.stats,
        "io_stats": host.io_stats,
        "req_timeout": host.req_timeout,
        "inject_eagain": host.inject_eagain,
        "cpu": host.cpu,
    })
    for ring in host.rings.values():
        ring.disconnect()


if __name__ == "__main__":
    main()
