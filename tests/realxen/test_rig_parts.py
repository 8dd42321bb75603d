"""The rig's own parts, without QEMU: the cpio writer (read back by busybox's cpio when
the host has it, else by a parser of the format), module dependencies, the verdicts read
from a console log, and what blkfront must print for advertised features."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.realxen import debs, initramfs, rig


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, content) of a newc archive."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        head = data[pos:pos + 110]
        assert head[:6] == b"070701", f"bad magic at {pos}"
        fields = [int(head[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        content = data[pos:pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, content)


def test_cpio_holds_files_links_and_merged_usr(tmp_path: Path) -> None:
    image = initramfs.Initramfs()
    image.add_bytes("/bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    image.add_bytes("/etc/odd", b"abc")  # a size that needs padding
    image.add_symlink("/sbin/hi", "../bin/hello")
    out = tmp_path / "x.cpio"
    image.write(out)
    entries = _read_newc(out.read_bytes())
    mode, content = entries["usr/bin/hello"]
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o755
    assert content == b"#!/bin/sh\necho hi\n"
    assert entries["etc/odd"][1] == b"abc"
    assert stat.S_ISLNK(entries["bin"][0]) and entries["bin"][1] == b"usr/bin"
    assert entries["usr/sbin/hi"][1] == b"../bin/hello"
    # parents before children, as the kernel's unpacker needs
    names = list(entries)
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/hello")


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox not installed")
def test_cpio_extracts_with_busybox(tmp_path: Path) -> None:
    image = initramfs.Initramfs()
    image.add_bytes("/etc/data", bytes(range(256)) * 3)
    archive = tmp_path / "x.cpio"
    image.write(archive)
    dest = tmp_path / "out"
    dest.mkdir()
    with archive.open("rb") as f:
        subprocess.run(["busybox", "cpio", "-id"], stdin=f, cwd=dest, check=True,
                       capture_output=True)
    assert (dest / "etc/data").read_bytes() == bytes(range(256)) * 3
    assert (dest / "bin").is_symlink()


def test_module_dependencies_come_first(tmp_path: Path) -> None:
    mods = tmp_path / "kernel"
    mods.mkdir()
    (mods / "a.ko").write_bytes(b"\x7fELF junk\0depends=b_mod,c\0vermagic=6.1\0")
    (mods / "b_mod.ko").write_bytes(b"\0depends=c\0")
    (mods / "c.ko").write_bytes(b"\0depends=\0")
    image = initramfs.Initramfs()
    order = image.add_modules(tmp_path, ["a", "builtin-thing"])
    assert order == ["c.ko", "b_mod.ko", "a.ko"]
    assert "/modules/a.ko" in image.entries


def _run(lines: list[str]) -> rig.Run:
    run = rig.Run("blktap3")
    run.lines = [(float(i), line) for i, line in enumerate(lines)]
    return run


# Lines fio 3.33 printed (terse v3, cut after the read fields the rig reads).
FIO_4K = ("3;fio-3.33;4k-randread-qd16;0;0;351872;351520;87880;1001;1;561;1.743757;3.342606;"
          "24;6239;179.890986;189.826576;1.000000%=129;5.000000%=138;10.000000%=142;"
          "20.000000%=148;30.000000%=152;40.000000%=158;50.000000%=162;60.000000%=166;"
          "70.000000%=173;80.000000%=179;90.000000%=191;95.000000%=214;99.000000%=456;"
          "99.500000%=497;99.900000%=3850;99.950000%=4554;99.990000%=6258;0%=0;0%=0;0%=0;"
          "35;6240;181.634742;189.871897;356880")
FIO_1M = FIO_4K.replace("4k-randread-qd16", "1m-seqread-qd8").replace(";87880;", ";343;")
PASSING = [
    "(XEN) Xen version 4.17",
    "@@STEP attach",
    "@@BACKEND-KEYS state=4 feature-flush-cache=1 feature-persistent=0",
    "[guest] @@G BLKFRONT [ 1.0] blkfront: xvda: flush diskcache: enabled; persistent "
    "grants: disabled; indirect descriptors: disabled; bounce buffer: disabled;",
    *[f"[guest] @@G RESULT {name} pass" for name in rig.EXPECTED if not name.startswith(
        ("image-", "features", "fio-figures"))],
    "[guest] @@G QUEUES 2",
    f"[guest] @@G FIO {FIO_4K}",
    f"[guest] @@G FIO {FIO_1M}",
    "@@RESULT image-files pass 250 files",
    "@@RESULT image-pattern pass",
    "@@TAPDISK-MAPS 178 /usr/lib/x86_64-linux-gnu/libxengnttab.so.1.2 "
    "/usr/lib/x86_64-linux-gnu/libxenevtchn.so.1.2",
    "@@TAPDISK-FDS 178 /dev/xen/evtchn /dev/xen/gntdev",
    "@@STEP end",
]


def test_a_complete_passing_log_passes() -> None:
    run = _run(PASSING)
    assert run.failure() is None
    assert run.results()["features"] == ("pass", "")
    assert [name for name, _ in run.steps()] == ["xen", "attach", "end"]


def test_a_failed_check_names_the_step_and_check() -> None:
    lines = [line.replace("RESULT fsck1 pass", "RESULT fsck1 fail") for line in PASSING]
    failure = _run(lines).failure()
    assert failure is not None and "fsck1" in failure


def test_a_missing_check_fails() -> None:
    failure = _run([line for line in PASSING if "odirect" not in line]).failure()
    assert failure is not None and "odirect" in failure


def test_dom0_fail_line_reports_the_last_step() -> None:
    failure = _run(["@@STEP attach", "@@FAIL attach", "@@STEP end"]).failure()
    assert failure == "end: attach"


def test_features_mismatch_fails() -> None:
    lines = [line.replace("feature-persistent=0", "feature-persistent=1") for line in PASSING]
    verdict = _run(lines).results()["features"]
    assert verdict[0] == "fail" and "persistent grants: enabled" in verdict[1]


def test_a_simulated_xen_library_fails_the_real_xen_check() -> None:
    lines = [line + " /opt/blktap3/blktap3/sim/_build/libxensim.so"
             if line.startswith("@@TAPDISK-MAPS") else line for line in PASSING]
    assert _run(lines).results()["real-xen-libs"][0] == "fail"
    no_gntdev = [line.replace("/dev/xen/gntdev", "") for line in PASSING]
    assert _run(no_gntdev).results()["real-xen-libs"][0] == "fail"


def test_user_space_faults_are_found() -> None:
    run = _run([*PASSING, "[guest] [ 3.2] sh[71]: segfault at 8 ip 00007f sp 00007ff"])
    assert len(run.faults()) == 1


@pytest.mark.parametrize(("keys", "want"), [
    ({"feature-flush-cache": "1"}, {"flush diskcache": "enabled"}),
    ({"feature-barrier": "1"}, {"barrier": "enabled"}),
    ({}, {"barrier or flush": "disabled"}),
    ({"feature-max-indirect-segments": "256", "feature-persistent": "1"},
     {"indirect descriptors": "enabled", "persistent grants": "enabled"}),
])
def test_expected_blkfront_line(keys: dict[str, str], want: dict[str, str]) -> None:
    got = rig.expected_blkfront(keys)
    for name, state in want.items():
        assert got[name] == state


def test_fio_figures_are_read_from_the_terse_lines() -> None:
    run = _run(PASSING)
    jobs = run.fio()
    assert jobs["4k-randread-qd16"] == {"iops": 87880.0, "bw_kib": 351520.0,
                                        "clat_p50_us": 162.0, "error": 0.0}
    assert jobs["1m-seqread-qd8"]["iops"] == 343.0
    assert run.queues() == 2
    assert run.results()["fio-figures"] == ("pass", "")


def test_our_tapdisks_requests_per_queue_come_from_its_stats_line() -> None:
    # What our tap-ctl stats prints while a 2-queue VBD is served, then again after the
    # guest went (no ring: no xenbus object); the last served figures are kept.
    served = ('@@TAPDISK-STATS { "name": "aio:/img", "xenbus": { "pool": "td-xenio-default", '
              '"domid": 1, "devid": 51712, "reqs": [ 700, 700 ], "kicks": [ 9, 9 ], '
              '"queues": [ { "reqs": [ 300, 300 ], "kicks": [ 4, 4 ] }, '
              '{ "reqs": [ 400, 400 ], "kicks": [ 5, 5 ] } ] } }')
    gone = '@@TAPDISK-STATS { "name": "aio:/img", "reqs_outstanding": 0 }'
    run = _run([*PASSING, served, gone, "@@TAPDISK-STATS not json"])
    assert run.queue_requests() == [300, 400]
    one = served.split(', "queues"')[0] + " } }"
    assert _run([*PASSING, one]).queue_requests() == [700]
    assert _run(PASSING).queue_requests() is None  # blkback's run: no tapdisk
    table = rig.fio_table(_run(PASSING).summary(), run.summary())
    assert "ours: queues=2 (tapdisk requests per queue 300/400)" in table


def test_a_fio_job_without_io_or_missing_fails() -> None:
    no_io = [line.replace(";87880;", ";0;") for line in PASSING]
    assert _run(no_io).results()["fio-figures"][0] == "fail"
    one_job = [line for line in PASSING if FIO_1M not in line]
    failure = _run(one_job).failure()
    assert failure is not None and "fio-figures" in failure
    assert rig.fio_terse("3;fio-3.33;short") is None


def test_the_pair_table_gives_ours_over_blkback() -> None:
    ours = _run(PASSING).summary()
    slower = [line.replace(";87880;", ";43940;") for line in PASSING]
    theirs = _run(slower).summary()
    pair = rig.fio_pair(theirs, ours)
    assert pair["ratio_ours_over_blkback"] == {"1m-seqread-qd8": 1.0, "4k-randread-qd16": 2.0}
    table = rig.fio_table(theirs, ours)
    assert "4k-randread-qd16" in table and " 2.00 " in table
    assert "queues=2" in table and "persistent grants: disabled" in table


# What Xen 4.20's `xentop -b -i 1 -x` prints (columns as in tools/xentop/xentop.c).
XENTOP = [
    "      NAME  STATE   CPU(sec) CPU(%)     MEM(k) MEM(%)  MAXMEM(k) MAXMEM(%) VCPUS NETS "
    "NETTX(k) NETRX(k) VBDS   VBD_OO   VBD_RD   VBD_WR  VBD_RSECT  VBD_WSECT SSID",
    "  Domain-0 -----r         25    0.0    1048576   50.0   no limit       n/a     2    0"
    "        0        0    0        0        0        0          0          0    0",
    "     guest --b---          3    0.0     262144   12.5     263168      12.5     1    0"
    "        0        0    1        0     1830     1467      41786      55122    0",
    "VBD 51712 [ca: 0]  OO:        0   RD:     1830   WR:     1467  RSECT:    41786  WSECT:"
    "    55122",
]


def _trixie(lines: list[str]) -> rig.Run:
    run = _run(lines)
    run.dist = "trixie"
    return run


def test_xentop_shows_the_vbd_counters() -> None:
    run = _run([f"@@XENTOP {line}" for line in XENTOP])
    verdict = run.results()["xentop-vbd"]
    assert verdict[0] == "pass" and "VBD_RD=1830 VBD_WR=1467" in verdict[1]
    idle = [line.replace("1830", "0") for line in XENTOP]
    assert _run([f"@@XENTOP {line}" for line in idle]).results()["xentop-vbd"][0] == "fail"
    no_guest = [f"@@XENTOP {line}" for line in XENTOP if "guest" not in line]
    assert _run(no_guest).results()["xentop-vbd"][0] == "fail"


def test_the_xl_checks_are_expected_on_trixie_only() -> None:
    assert _run(PASSING).failure() is None
    failure = _trixie(PASSING).failure()
    assert failure is not None and "xentop-vbd" in failure and "nbd-live-read" in failure
    xl = [*PASSING[:-1], *(f"@@RESULT {name} pass" for name in rig.EXPECTED_XL
                           if name != "xentop-vbd"),
          *(f"@@XENTOP {line}" for line in XENTOP), PASSING[-1]]
    assert _trixie(xl).failure() is None


def test_the_trixie_rig_boots_xen_4_20() -> None:
    command = rig.qemu_command(Path("xen.elf"), Path("/w/dom0.cpio"), "blktap3", "trixie")
    assert "rigmode=blktap3 rigdist=trixie" in command[-1]


def test_a_distribution_loader_resolves_libraries() -> None:
    loader = Path("/lib64/ld-linux-x86-64.so.2")
    if not loader.exists():
        pytest.skip("no x86-64 glibc loader here")
    libs = dict(initramfs.Initramfs(loader=loader).libraries_of(Path(sys.executable)))
    assert "libc.so.6" in libs and Path(libs["libc.so.6"]).exists()
    assert any("ld-linux" in name for name in libs)


def test_an_unknown_distribution_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLKTAP3_REALXEN_DIST", "sid")
    with pytest.raises(ValueError, match="bookworm, trixie"):
        debs.dist()
    monkeypatch.setenv("BLKTAP3_REALXEN_DIST", "trixie")
    assert debs.dist() == "trixie" and debs.DISTS["trixie"] == "4.20"


def test_a_work_directory_in_use_gives_a_spare(tmp_path: Path) -> None:
    work = tmp_path / "pytest-blktap3"
    with rig.claimed(work) as first:
        assert first == work
        with rig.claimed(work) as second:
            assert second != work and second.parent == tmp_path and second.is_dir()
        assert not second.exists()
    with rig.claimed(work) as again:
        assert again == work
