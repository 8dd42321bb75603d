"""Multi-queue on the simulated Xen host: one XENBLKIF_CONNECT per queue, each ring served
by its own thread of a real tapdisk, I/O through every queue, and one DISCONNECT taking
them all down; a queue sent out of order, or failing, leaves no queue served."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from blktap3.abi import BlkifProtocol
from blktap3.ctl import ops
from blktap3.ctl import protocol as p
from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.datapath import vhdformat as vhd
from tests.integration.datapath.test_ring_io import stamp_block
from tests.support.tools import run_tool

from .conftest import MiB

# The guest domain and the opened VBD of the single-queue tests.
from .test_ring import DEVID, GUEST, machine, vbd  # noqa: F401

pytestmark = pytest.mark.integration
xensim = pytest.importorskip("blktap3.sim.xensim", reason="the simulated Xen host is missing")
lineproc = pytest.importorskip("blktap3.datapath.lineproc", reason="the data path is missing")

QUEUES = 3


@pytest.fixture
def queues(machine: Any) -> Iterator[list[tuple[Any, dict[str, Any]]]]:  # noqa: F811
    """QUEUES rings of the guest, each shared by its own driver (a page each)."""
    rings = []
    try:
        for _ in range(QUEUES):
            proc = lineproc.LineProcess([sys.executable, "-m", "blktap3.sim.guestdrv"],
                                        xensim.process_env(machine.run_dir, GUEST))
            rings.append((proc, proc.call("open", backend=0, order=0,
                                          protocol=BlkifProtocol.NATIVE)))
        yield rings
    finally:
        for proc, _ in rings:
            proc.close()


def _blkif(rings: list[tuple[Any, dict[str, Any]]]) -> dict[str, Any]:
    first = rings[0][1]
    return {"domid": GUEST, "devid": DEVID, "grefs": (first["grefs"][0],), "order": 0,
            "port": first["port"], "proto": int(BlkifProtocol.NATIVE),
            "extra_queues": [((info["grefs"][0],), info["port"]) for _, info in rings[1:]]}


def _xenbus(client: TapdiskClient, minor: int) -> dict[str, Any] | None:
    xenbus: dict[str, Any] | None = json.loads(client.stats(minor)).get("xenbus")
    return xenbus


def test_every_queue_is_served_counted_and_torn_down_together(
    queues: list[tuple[Any, dict[str, Any]]], vbd: tuple[TapdiskClient, int, Path]  # noqa: F811
) -> None:
    client, minor, disk = vbd
    client.connect_xenblkif(minor, **_blkif(queues))
    # tapback restarting replays queue 0 first: the tapdisk says "already".
    with pytest.raises(CtlError) as err:
        client.connect_xenblkif(minor, **_blkif(queues))
    assert err.value.errno == errno.EALREADY

    for i, (proc, _) in enumerate(queues):  # each queue writes its own sectors
        data = os.urandom(4096 * (i + 1))
        assert proc.call("write", sector=64 * i, data=data.hex()) == 0
        assert disk.read_bytes()[64 * i * 512 : 64 * i * 512 + len(data)] == data
        other = queues[(i + 1) % QUEUES][0]  # and another queue reads them back
        reply = other.call("read", sector=64 * i, count=len(data) // 512)
        assert reply["status"] == 0 and bytes.fromhex(reply["data"]) == data

    xenbus = _xenbus(client, minor)
    assert xenbus is not None
    per_queue = xenbus["queues"]
    assert len(per_queue) == QUEUES
    assert all(q["reqs"][0] == 2 and q["reqs"][1] == 2 for q in per_queue)  # 1 write, 1 read
    assert xenbus["reqs"] == [2 * QUEUES, 2 * QUEUES]  # blktap's field: the sum

    client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)
    assert _xenbus(client, minor) is None
    # every queue's ring was let go: the same queues connect again from queue 0
    client.connect_xenblkif(minor, **_blkif(queues))
    assert len((_xenbus(client, minor) or {})["queues"]) == QUEUES


def test_a_queue_out_of_order_is_refused_and_a_failing_queue_leaves_none(
    queues: list[tuple[Any, dict[str, Any]]], vbd: tuple[TapdiskClient, int, Path]  # noqa: F811
) -> None:
    client, minor, _ = vbd
    blkif = _blkif(queues)
    first = {k: v for k, v in blkif.items() if k != "extra_queues"}
    message = p.Blkif(GUEST, DEVID, first["grefs"], 0, first["proto"], port=first["port"],
                      queue=1, nr_queues=QUEUES)
    with pytest.raises(CtlError) as err:  # queue 1 before queue 0
        client._simple(p.MessageType.XENBLKIF_CONNECT, minor, message)
    assert err.value.errno == errno.EINVAL
    assert _xenbus(client, minor) is None

    # queue 2 names a grant the guest never gave: queues 0 and 1 go down with it
    bad = [*blkif["extra_queues"][:1], ((999_999,), blkif["extra_queues"][1][1])]
    with pytest.raises(CtlError):
        client.connect_xenblkif(minor, **{**blkif, "extra_queues": bad})
    assert _xenbus(client, minor) is None
    client.connect_xenblkif(minor, **blkif)  # and the VBD takes the good ones afterwards
    assert len((_xenbus(client, minor) or {})["queues"]) == QUEUES


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-utils missing")
def test_queues_allocating_vhd_blocks_at_once_leave_a_sound_image(
    queues: list[tuple[Any, dict[str, Any]]], machine: Any, ctl_root: Path,  # noqa: F811
    seen_pids: set[int], tmp_path: Path,
) -> None:
    """Every queue's thread writes new blocks of one dynamic VHD at the same time: each
    reads back what it wrote, and qemu-img converts the image to what they wrote."""
    image = tmp_path / "d.vhd"
    size = 8 * MiB  # four 2 MiB blocks, each queue allocating its share
    vhd.create(image, size)
    env = {**os.environ, **xensim.process_env(machine.run_dir, 0)}
    pid, minor, _ = ops.create(f"vhd:{image}", root=ctl_root, env=env)
    seen_pids.add(pid)
    client = TapdiskClient(pid)
    client.connect_xenblkif(minor, **_blkif(queues))
    share = size // 512 // QUEUES // 8 * 8

    def write(i: int) -> dict[str, int]:
        res: dict[str, int] = queues[i][0].call(
            "run", qd=8, bs=4096, read_pct=0, start=i * share, span=share, ios=share // 8,
            verify=True, stamp=10 + i)
        return res

    with ThreadPoolExecutor(QUEUES) as pool:
        results = list(pool.map(write, range(QUEUES)))
    assert all((r["errors"], r["lost"], r["mismatches"]) == (0, 0, 0) for r in results)
    client.disconnect_xenblkif(minor, domid=GUEST, devid=DEVID)
    ops.destroy(pid, minor, root=ctl_root, timeout=30)
    out = tmp_path / "out.raw"
    run_tool("qemu-img", "convert", "-f", "vpc", "-O", "raw", image, out)
    content = out.read_bytes()
    for i in range(QUEUES):
        for s in range(i * share, (i + 1) * share, 97):  # a sample of each share
            assert content[s * 512 : (s + 1) * 512] == stamp_block(s, 10 + i)
