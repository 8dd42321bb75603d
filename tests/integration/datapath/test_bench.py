"""``blktap3-bench`` measures the issue's path: guest driver -> ring -> a real tapdisk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
from blktap3.tools import bench, bench_mirror, bench_ring

from tests.support import signal_midway, tapdisk_pids, wait_gone, wait_until

pytestmark = pytest.mark.integration


def test_the_rig_drives_a_real_tapdisk_process(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    bench._prepare(disk, 8 << 20)
    with bench_ring.RingRig(tmp_path / "xen", disk) as rig:
        pid = rig.vbds["disk"].pid
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"blktap3.tapdisk" in cmdline
        figures = rig.run("randread", 4096, 4, 0.3)
        served = rig.last["tapdisk_stats"]
        # --polling: polling-duration reaches the ring at connect (no threshold: it
        # spins); the run before it was not polling at all.
        polled = rig.run("randread", 4096, 1, 0.2, polling=(200, 0))
        null = rig.run_null(0.2)
    ios = rig.last["ios"]  # the null run's
    # Every request the guest counted went through the tapdisk's ring and image.
    assert served["xenbus"]["reqs"][1] == served["images"][0]["hits"][0] > 0
    assert served["secs"][0] == 8 * served["images"][0]["hits"][0]
    assert figures["ours_iops"] > 0 and figures["ours_p50_us"] > 0
    assert figures["cpu_us_per_req"] > 0 and figures["guest_cpu_us_per_req"] > 0
    assert figures["spins_per_req"] == 0 and polled["spins_per_req"] > 0
    assert served["xenbus"]["polling"] == {"polls": 0, "busy": 0, "idle_threshold": 0}
    assert null["ours_iops"] > 0 and ios > 0 and "ours_mbps" not in null
    # The tapdisks are gone with the rig (each exits just after answering its DETACH).
    wait_until(lambda: not Path(f"/proc/{pid}").exists() or b"blktap3.tapdisk" not in Path(
        f"/proc/{pid}/cmdline").read_bytes(), what="the rig's tapdisk gone")


def test_the_1mib_workloads_travel_as_one_indirect_request_a_block(tmp_path: Path) -> None:
    assert {"1M seqread QD8", "1M seqwrite QD8"} <= {w["workload"] for w in bench.WORKLOADS}
    disk = tmp_path / "disk.img"
    bench._prepare(disk, 8 << 20)
    with bench_ring.RingRig(tmp_path / "xen", disk) as rig:
        for rw in ("read", "write"):
            figures = rig.run(rw, 1 << 20, 2, 0.2)
            res, served = rig.last, rig.last["tapdisk_stats"]
            assert res["ios"] > 0 and res["requests"] == res["indirect"] == res["ios"]
            assert figures["ours_mbps"] > 0 and res["bad_ops"] == 0
            # The tapdisk served them as indirect reads (writes): one hit per block.
            hits = served["images"][0]["hits"][0 if rw == "read" else 1]
            assert hits == served["xenbus"]["reqs"][1] == res["ios"]
            assert served["secs"][0 if rw == "read" else 1] == 2048 * res["ios"]


def test_the_multi_queue_rows_drive_every_queue(tmp_path: Path) -> None:
    assert bench.MULTI_QUEUE == (1, 2, 4)
    disk = tmp_path / "disk.img"
    bench._prepare(disk, 8 << 20)
    with bench_ring.RingRig(tmp_path / "xen", disk) as rig:
        figures = rig.run_queues(2, "randread", 4096, 4, 0.2)
        served = rig.last["tapdisk_stats"]
        after = json.loads(rig.vbds["disk"].client.stats(rig.vbds["disk"].minor))
    assert figures["ours_iops"] > 0 and figures["cpu_us_per_req"] > 0
    # Both queues served reads, counted apart and summed in blktap's field.
    queues = served["xenbus"]["queues"]
    assert len(queues) == 2 and all(q["reqs"][1] > 0 for q in queues)
    assert served["xenbus"]["reqs"][1] == sum(q["reqs"][1] for q in queues)
    assert "xenbus" not in after  # both went with the one DISCONNECT


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_the_command_writes_the_issue_keys(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # The default --dir (/var/tmp): the control sockets' paths must stay short.
    rc = bench.main(["--json", str(out), "--runtime", "0.5", "--rounds", "3", "--size-mib", "8",
                     "--only", "QD1"])
    assert rc == 0
    [qd1, null] = json.loads(out.read_text())
    assert set(qd1) == {*bench.JSON_KEYS, bench.QD1_KEY, bench.QD1_RING_KEY}
    assert qd1["workload"] == "4k randread QD1" and qd1["rounds"] == 3
    # Beside it the ring's own round trip, no I/O: the null image at QD1.
    assert null["workload"].strip() == "null ring QD1" and null["ours_iops"] > 0
    assert qd1[bench.QD1_RING_KEY] > 0
    # The median of three rounds' ratios lies within their spread.
    assert 0 < qd1["ratio_min"] <= qd1["ratio"] <= qd1["ratio_max"]
    assert qd1["qd1_added_us"] is not None
    assert qd1["fio_iops"] > 0 and qd1["cpu_us_per_req"] > 0


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_bench_leaves_no_tapdisk_and_no_file(sig: signal.Signals) -> None:
    """Issue 17: stopped mid-run, it left two tapdisks and its 512 MiB file."""
    work = Path(tempfile.mkdtemp(prefix="b3b-", dir="/tmp"))  # short: socket paths
    try:
        bench_cmd = [str(Path(sys.executable).parent / "blktap3-bench"), "--dir", str(work),
                     "--size-mib", "8", "--runtime", "600", "--only", "QD1"]
        pids: set[int] = set()

        def started(_: object) -> None:
            # Stopped while its tapdisks start, or while fio or the guest runs.
            wait_until(lambda: [p for c in work.glob("*/ctl") for p in tapdisk_pids(c)],
                       60, "the bench's first tapdisk")
            pids.update(p for c in work.glob("*/ctl") for p in tapdisk_pids(c))

        code, _, err = signal_midway(bench_cmd, sig, started)
        assert code == 130, err
        assert "Traceback" not in err and "interrupted" in err
        wait_gone(pids, 30)
        assert list(work.iterdir()) == []  # the file, the sockets, the simulated machine
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_vhd_chain_reads_as_the_raw_file_with_partial_blocks_in_the_leaf(
        tmp_path: Path) -> None:
    from blktap3.datapath import Image
    from blktap3.datapath import vhdformat as vhd

    disk = tmp_path / "disk.img"
    bench._prepare(disk, 12 << 20)  # 6 blocks of 2 MiB
    leaf = bench._prepare_chain(disk, bench._prepare_vhd(disk, tmp_path / "base.vhd"))
    chain = vhd.open_chain(leaf)
    assert [c.path.name for c in chain] == ["leaf.vhd", "mid.vhd", "base.vhd"]
    img = Image.open("vhd", str(leaf), readonly=True)
    try:
        assert img.read(0, 12 << 11) == disk.read_bytes()
    finally:
        img.close()
    # Whole blocks in mid (1, 4) and leaf (2, 5); 4 KiB at the start of 0, 3 in the leaf.
    used = [[i for i, e in enumerate(c.bat) if e != vhd.BAT_UNUSED] for c in chain]
    assert used == [[0, 2, 3, 5], [1, 4], [0, 1, 2, 3, 4, 5]]
    with open(leaf, "rb") as f:
        assert chain[0].bitmap(f, 0)[:2] == b"\xff\x00" and chain[0].bitmap(f, 2)[-1] == 0xFF


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_image_vhd_prints_a_row_per_vhd_with_its_ratio_to_raw(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    rc = bench.main(["--json", str(out), "--runtime", "0.3", "--rounds", "2", "--size-mib", "8",
                     "--only", "1M seqread", "--image", "vhd"])
    assert rc == 0
    raw, dynamic, chain = json.loads(out.read_text())
    assert [r["workload"] for r in (raw, dynamic, chain)] == [
        "1M seqread QD8", "  vhd 1M seqread QD8", "  vhd chain3 1M seqread QD8"]
    for row in (dynamic, chain):
        assert row["raw_iops"] > 0 and row["ours_iops"] > 0 and row["rounds"] == 2
        assert 0 < row["ratio_min"] <= row["ratio"] <= row["ratio_max"]


@pytest.mark.skipif(bench_mirror.unavailable() is not None, reason="qemu-nbd is not installed")
def test_the_mirror_rows_run_mirrored_vbds_whose_secondaries_follow(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    bench._prepare(disk, 8 << 20)
    shape = ("randwrite", 4096, 32, 0.3)
    with bench_ring.RingRig(tmp_path / "xen", disk) as rig, \
            bench_mirror.secondaries(rig, tmp_path) as (file_sec, nbd_sec):
        # After a mirrored QD32 run (both halves of each write in flight at once for the
        # file), each secondary, a copy of the primary before, still equals it.
        for seed, (name, secondary) in enumerate((("mirror-file", file_sec),
                                                  ("mirror-nbd", nbd_sec))):
            # Random bytes again, the secondary a copy (the guest writes zeroes).
            disk.write_bytes(os.urandom(8 << 20))
            shutil.copyfile(disk, secondary)
            before = disk.read_bytes()
            rig.run(*shape, image=name, seed=seed + 1)
            mirror = rig.last["tapdisk_stats"]["mirror"]
            assert mirror["active"] and mirror["writes"] >= rig.last["ios"] > 0
            assert disk.read_bytes() == secondary.read_bytes() != before, name
        # The unmirrored VBD of the same file: the secondaries stay as they were. (Not
        # "differ from the primary": a fast run zeroes every block of both.)
        disk.write_bytes(os.urandom(8 << 20))
        before = disk.read_bytes()
        kept = file_sec.read_bytes(), nbd_sec.read_bytes()
        rig.run(*shape, seed=3)
        assert disk.read_bytes() != before
        assert (file_sec.read_bytes(), nbd_sec.read_bytes()) == kept
        rows = list(bench_mirror.rows(rig, "4k randwrite QD32", shape, 1, True))
    assert [r["workload"] for r in rows] == ["  -2 aio: 4k randwrite QD32",
                                            "  -2 nbd: 4k randwrite QD32"]
    assert all(r["ratio"] > 0 and r["ours_iops"] > 0 and r["plain_iops"] > 0 for r in rows)
