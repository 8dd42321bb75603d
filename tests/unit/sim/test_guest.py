"""The guest process's pieces without a host: options, workload phases, typed figures,
the report's JSON line and its summary (what `blktap3-sim guest run` prints)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from blktap3.fsm import DiskInfo
from blktap3.sim.frontend import HandshakeFigures, Step
from blktap3.sim.guest import EXIT_USAGE, GuestReport, GuestResult
from blktap3.sim.guest.child import GuestOptions, main, parse_options
from blktap3.sim.guest.report import format_report
from blktap3.sim.guest.workload import (
    CycleFigures,
    IoOptions,
    IoTotals,
    PhaseFigures,
    WorkloadError,
    check_phases,
    run_workload,
)

# What GuestRing.run returns (the C driver's counts), in its order.
RING_RUN = {"ios": 2048, "reads": 0, "writes": 2048, "bytes": 8 << 20, "errors": 0,
            "duplicates": 0, "mismatches": 0, "lost": 0, "kicks_out": 10, "kicks_in": 12,
            "elapsed_ns": 50_000_000, "p50_ns": 200_000, "p99_ns": 900_000,
            "max_ns": 1_000_000, "iops": 40960.0, "timed_out": False}


def phase(name: str = "write", **changes: Any) -> PhaseFigures:
    return PhaseFigures.from_ring(name, {**RING_RUN, **changes})


def test_a_phase_keeps_the_json_keys_the_guest_always_printed() -> None:
    p = phase()
    assert list(p.as_json()) == [*RING_RUN, "phase", "mbps", "queues", "indirect"]
    assert p.as_json()["mbps"] == pytest.approx((8 << 20) / 0.05 / 1e6)
    assert PhaseFigures.from_json(json.loads(json.dumps(p.as_json()))) == p


@pytest.mark.parametrize(("changes", "why"), [({"errors": 2}, "write: 2 errors"),
                                              ({"lost": 1, "mismatches": 3},
                                               "write: 1 lost, 3 mismatches"),
                                              ({"timed_out": True}, "write: timed out")])
def test_a_phase_fails_on_errors_losses_mismatches_or_a_timeout(changes: dict[str, Any],
                                                                why: str) -> None:
    assert check_phases([phase("read back"), phase(**changes)]) == why
    assert check_phases([phase()]) is None


def test_totals_add_every_phase_up() -> None:
    totals = IoTotals.of([phase(), phase("read back", reads=2048, writes=0)])
    assert (totals.ios, totals.reads, totals.writes) == (4096, 2048, 2048)
    assert totals.iops == round(4096 / 0.1, 1) and totals.mbps == round((16 << 20) / 0.1 / 1e6, 2)
    assert IoTotals.of([]) == IoTotals()


class FakeRing:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def run(self, **params: Any) -> dict[str, Any]:
        self.calls.append(params)
        return dict(RING_RUN)


def test_verify_writes_then_reads_back_the_same_stamp() -> None:
    ring = FakeRing()
    seen: list[str] = []
    phases = run_workload([ring], "verify", 1 << 20, False, IoOptions(bs=4096, span_mib=1),
                          lambda p: seen.append(p.phase))
    assert [p.phase for p in phases] == seen == ["write", "read back"]
    write, read = ring.calls
    assert write["read_pct"] == 0 and read["read_pct"] == 100
    assert write["ios"] == read["ios"] == 256 and write["span"] == 2048
    assert write["verify"] and read["verify"] and write["stamp"] == read["stamp"] != 0


def test_a_timed_out_phase_ends_the_workload_and_is_its_failure() -> None:
    """Its requests are still on the ring: the next phase would only fail with EBUSY."""
    class StallingRing(FakeRing):
        def run(self, **params: Any) -> dict[str, Any]:
            self.calls.append(params)
            return {**RING_RUN, "lost": 3, "timed_out": True, "stall": "ring: req_prod 9"}

    ring = StallingRing()
    phases = run_workload([ring], "randrw", 1 << 20, False, IoOptions(bs=4096, span_mib=1))
    assert [p.phase for p in phases] == ["write"] and len(ring.calls) == 1
    assert check_phases(phases) == "write: 3 lost (ring: req_prod 9)"
    assert PhaseFigures.from_json(json.loads(json.dumps(phases[0].as_json()))) == phases[0]
    # Two queues: each stalled queue says where its ring stood.
    rings = [StallingRing(), StallingRing()]
    two = run_workload(rings, "verify", 1 << 20, False, IoOptions(bs=4096, span_mib=1))
    assert two[0].stall == "queue 0 ring: req_prod 9; queue 1 ring: req_prod 9"


def test_several_queues_share_the_depth_and_the_region_and_add_up() -> None:
    # As blk-mq feeds blkfront's queues from their CPUs: every ring at once, the queue
    # depth shared out, each its own slice of the region (verified writes never overlap).
    rings = [FakeRing() for _ in range(4)]
    phases = run_workload(rings, "verify", 1 << 20, False,
                          IoOptions(qd=16, bs=4096, span_mib=1))
    starts = sorted(r.calls[0]["start"] for r in rings)
    assert starts == [0, 512, 1024, 1536] and all(r.calls[0]["span"] == 512 for r in rings)
    assert all(c["qd"] == 4 and c["ios"] == 64 for r in rings for c in r.calls)
    assert len({r.calls[0]["seed"] for r in rings}) == 4
    write = phases[0]
    assert write.ios == 4 * 2048 and write.queues == (2048,) * 4
    assert write.elapsed_ns == 50_000_000 and write.iops == pytest.approx(4 * 2048 / 0.05)
    assert PhaseFigures.from_json(json.loads(json.dumps(write.as_json()))) == write


def test_a_writing_workload_on_a_read_only_disk_or_a_tiny_one_is_refused() -> None:
    with pytest.raises(WorkloadError, match="read-only"):
        run_workload([FakeRing()], "randrw", 1 << 20, True, IoOptions())
    with pytest.raises(WorkloadError, match="smaller than one 4096 B I/O"):
        run_workload([FakeRing()], "read", 4, False, IoOptions())
    ring = FakeRing()
    assert run_workload([ring], "none", 1 << 20, True, IoOptions()) == [] and not ring.calls


def report() -> GuestReport:
    return GuestReport(
        ok=True, domid=3, devid=51712, personality="linux", workload="verify",
        backend="/local/domain/0/backend/vbd3/3/51712",
        disk=DiskInfo(sectors=32768, info=0, physical_sector_size=4096),
        features={"feature-barrier": "1"},
        handshakes=(HandshakeFigures(12.25, 6.5), HandshakeFigures(None, None)),
        resizes=((16384, 32768),),
        cycles=(CycleFigures(32768, (phase(), phase("read back", reads=2048, writes=0))),),
        io=IoTotals.of([phase(), phase("read back", reads=2048, writes=0)]),
        final_state="closed",
        timeline=(Step(1.5, "fe", "start (linux)"), Step(2.25, "be", "state=2 (INIT_WAIT)")))


def test_the_report_survives_its_json_line() -> None:
    line = json.dumps({"result": report().as_json()})
    assert GuestReport.from_json(json.loads(line)["result"]) == report()


def test_the_summary_reads_as_it_always_did() -> None:
    assert format_report(report()).splitlines() == [
        "guest 3 device 51712 (linux, workload verify), back-end "
        "/local/domain/0/backend/vbd3/3/51712",
        "  sectors 32768 (16.0 MiB), sector-size 512, info 0",
        "  features feature-barrier=1",
        "  handshake 1: Initialising -> both Connected 12.2 ms, Initialised -> back-end "
        "Connected 6.5 ms",
        "  handshake 2: Initialising -> both Connected -, Initialised -> back-end Connected -",
        "  write                 2048 I/Os     40960 IOPS    167.8 MB/s  p50 200 us "
        "p99 900 us  errors 0 mismatches 0 lost 0",
        "  read back             2048 I/Os     40960 IOPS    167.8 MB/s  p50 200 us "
        "p99 900 us  errors 0 mismatches 0 lost 0",
        "  total 4096 I/Os, 16.0 MiB: 40960 IOPS, 167.8 MB/s",
        "  OK: every byte written read back identically",
    ]


def test_a_guest_without_a_report_is_summed_up_by_its_error_and_stderr() -> None:
    result = GuestResult(1, GuestReport.failed("guest exited 1 without a result"),
                         "Traceback ...\nTypeError: front-end machine asked for X\n")
    assert not result.ok and result.sectors is None and result.iops == 0.0
    assert result.summary() == ("guest exited 1 without a result\n"
                                "  stderr: TypeError: front-end machine asked for X")
    assert not GuestResult(1, report()).ok  # the exit code counts too


def test_the_command_line_becomes_options() -> None:
    options = parse_options(["--run-dir", "/r", "--domid", "3", "--devid", "51712",
                             "--workload", "randrw", "--hold", "--cycles", "2"])
    assert options == GuestOptions(run_dir="/r", domid=3, devid=51712, workload="randrw",
                                   hold=True, cycles=2)
    assert options.usage_error() is None
    assert options.io() == IoOptions(timeout=30.0)


@pytest.mark.parametrize("bad", [["--qd", "0"], ["--bs", "1000"], ["--bs", "1049088"],
                                 ["--cycles", "0"]])
def test_options_out_of_range_are_a_usage_error(bad: list[str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--run-dir", "/r", "--domid", "3", "--devid", "51712", *bad]
    assert main(argv) == EXIT_USAGE
    assert capsys.readouterr().err == ("guest: --qd 1..256, --bs a multiple of 512 up to "
                                       "1048576, --cycles >= 1\n")
