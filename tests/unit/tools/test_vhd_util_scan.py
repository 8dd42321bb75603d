"""vhd-util scan's trees (-p) and LVM volume groups (-l) against blktap's (v4.0.8).

The LVM test builds a real volume group with Debian's lvm2 on a loop device, under a
private lvm.conf (only that device seen, `activation = 0`: nothing is activated, so no
device-mapper is needed: blktap reads a volume through its physical volume, and so do
we). VHDs are written into the volumes at offsets this test computes from `pvs`/`lvs`
fields other than the ones the scan reads. Without a blktap build (BLKTAP_BUILD) the
lines pinned here from vhd-util-scan.c are checked against ours alone."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from blktap3.tools import vhd_util

from blktap3.datapath import vhdformat as vhd
from tests.support.tools import blktap_vhd_util, run_tool

MiB = 1 << 20
BLKTAP_VHD_UTIL = blktap_vhd_util()


def ours(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    rc = vhd_util.main(["scan", *(str(a) for a in args)])
    return rc, capsys.readouterr().out


def theirs(*args: str | Path) -> tuple[int, str] | None:
    if BLKTAP_VHD_UTIL is None:
        return None
    res = run_tool(BLKTAP_VHD_UTIL, "scan", *args, check=False)
    return res.returncode, res.stdout


def test_pretty_print_shows_chains_as_trees(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    d = tmp_path
    size = 4 * MiB
    vhd.create(d / "base.vhd", size)
    for child, parent in (("mid.vhd", "base.vhd"), ("leaf1.vhd", "mid.vhd"),
                          ("leaf2.vhd", "mid.vhd"), ("other.vhd", "base.vhd")):
        vhd.create(d / child, 0, parent=d / parent)
    vhd.set_hidden(d / "mid.vhd", 1)
    vhd.create(d / "lone.vhd", size)
    vhd.create(d / "orphan.vhd", 0, parent=d / "lone.vhd")
    (d / "lone.vhd").unlink()
    (d / "bad.vhd").write_bytes(bytes(4096))

    def line(name: str, parent: str = "none", hidden: int = 0, indent: int = 0) -> str:
        return (f"{' ' * indent}vhd={name} capacity={size} size={(d / name).stat().st_size} "
                f"hidden={hidden} parent={parent}")

    # vhd-util-scan.c:326-400: errors at once, then the trees sorted by name, visible
    # children before hidden ones, 3 spaces a level, unscanned parents said so.
    rc, out = ours(capsys, "-p", "-c", "-m", d / "*.vhd")
    assert rc == 0
    assert out.splitlines() == [
        f"vhd={d / 'bad.vhd'} scan-error=-22 error-message='opening file'",
        line("base.vhd"),
        line("other.vhd", "base.vhd", indent=3),
        line("mid.vhd", "base.vhd", hidden=1, indent=3),
        line("leaf1.vhd", "mid.vhd", indent=6),
        line("leaf2.vhd", "mid.vhd", indent=6),
        line("orphan.vhd", "lone.vhd") + " (not found in scan)"]
    # Without -c the scan stops at the first bad image, with its errno.
    assert ours(capsys, "-p", "-m", d / "*.vhd") == (
        22, f"vhd={d / 'bad.vhd'} scan-error=-22 error-message='opening file'\n")
    # -a follows the parents; the tree then holds the whole chain.
    rc, out = ours(capsys, "-p", "-a", d / "leaf1.vhd")
    assert (rc, out.splitlines()) == (0, [line("base.vhd"),
                                          line("mid.vhd", "base.vhd", hidden=1, indent=3),
                                          line("leaf1.vhd", "mid.vhd", indent=6)])
    for args in (["-p", "-c", "-m", d / "*.vhd"], ["-p", "-v", "-c", "-m", d / "*.vhd"],
                 ["-p", "-M", "-c", d / "leaf1.vhd", d / "other.vhd"],
                 ["-p", "-a", d / "leaf1.vhd"], ["-c", d / "nofile.vhd", d / "leaf1.vhd"],
                 ["-a", d / "orphan.vhd"], ["-m", d / "nomatch*"], ["-p", "-m", d / "*.vhd"]):
        want = theirs(*args)
        if want is not None:
            assert ours(capsys, *args) == want, args


# ---- LVM ----------------------------------------------------------------------------


def _lvm(env: dict[str, str], *args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, env=env,
                          timeout=60).stdout


@pytest.fixture
def volume_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """(VG name, its loop device), seen only through a private LVM configuration."""
    if os.geteuid() != 0 or not shutil.which("vgcreate") or not shutil.which("losetup"):
        pytest.skip("needs root, lvm2 and losetup")
    backing = tmp_path / "pv.img"
    with open(backing, "wb") as f:
        f.truncate(64 * MiB)
    try:
        dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                             capture_output=True, text=True).stdout.strip()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"no loop device: {exc.stderr.strip()}")
    conf = tmp_path / "lvm"
    conf.mkdir()
    (conf / "lvm.conf").write_text(
        f'devices {{ filter = [ "a|^{dev}$|", "r|.*|" ] '
        'obtain_device_list_from_udev = 0 use_devicesfile = 0 }\n'
        f'global {{ activation = 0 locking_dir = "{conf}/lock" }}\n'
        "activation { udev_sync = 0 udev_rules = 0 }\n"
        "backup { backup = 0 archive = 0 }\n")
    monkeypatch.setenv("LVM_SYSTEM_DIR", str(conf))
    monkeypatch.setenv("LVM_SUPPRESS_FD_WARNINGS", "1")
    env = dict(os.environ)
    vg = f"VG_blktap3_{os.getpid()}"
    try:
        _lvm(env, "pvcreate", "-q", dev)
        _lvm(env, "vgcreate", "-q", "--setautoactivation", "n", "-s", "1m", vg, dev)
        yield vg, dev
    finally:
        subprocess.run(["vgremove", "-q", "-f", vg], capture_output=True, env=env, check=False)
        subprocess.run(["pvremove", "-q", "-f", dev], capture_output=True, env=env,
                       check=False)
        subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)


def _put(env: dict[str, str], vg: str, dev: str, lv: str, image: Path) -> int:
    """Write a file into a volume, at the offset `pvs`/`lvs` give for its extents;
    that offset."""
    pe_start = int(_lvm(env, "pvs", "--noheadings", "--nosuffix", "--units=b",
                        "-o", "pe_start", dev))
    extent = int(_lvm(env, "vgs", "--noheadings", "--nosuffix", "--units=b",
                      "-o", "vg_extent_size", vg))
    first = int(_lvm(env, "lvs", "--noheadings", "-o", "seg_pe_ranges", f"{vg}/{lv}")
                .split(":")[1].split("-")[0])
    with open(dev, "r+b") as f:
        f.seek(pe_start + first * extent)
        f.write(image.read_bytes())
        f.flush()
        os.fsync(f.fileno())
    return pe_start + first * extent


def test_lvm_volumes_are_scanned_through_their_physical_volume(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        volume_group: tuple[str, str]) -> None:
    vg, dev = volume_group
    env = dict(os.environ)
    for lv, mib in (("VHD-base", 8), ("VHD-leaf", 12), ("LV-raw", 4), ("VHD-leaf2", 6)):
        _lvm(env, "lvcreate", "-q", "-an", "-Zn", "-L", f"{mib}m", "-n", lv, vg)
    # An LVHD parent locator names the device-mapper path of the parent volume:
    # /dev/mapper/VG-VHD--base. A file of that name gives the locator that text.
    files = tmp_path / "files"
    files.mkdir()
    base, leaf = files / f"{vg}-VHD--base", files / f"{vg}-VHD--leaf"
    vhd.create(base, 6 * MiB)
    vhd.create(leaf, 0, parent=base)
    vhd.set_hidden(base, 1)
    _put(env, vg, dev, "VHD-base", base)
    _put(env, vg, dev, "VHD-leaf", leaf)
    _put(env, vg, dev, "VHD-leaf2", leaf)   # a clone: same parent

    def line(name: str, lv_mib: int, parent: str = "none", hidden: int = 0,
             indent: int = 0) -> str:
        return (f"{' ' * indent}vhd={name} capacity={6 * MiB} size={lv_mib * MiB} "
                f"hidden={hidden} parent={parent}")

    raw_error = "vhd=LV-raw scan-error=-22 error-message='invalid footer'"
    # Volumes in the order lvs lists them (creation), a raw one refused by its footer.
    rc, out = ours(capsys, "-l", vg, "-c", "-m", "*")
    assert (rc, out.splitlines()) == (0, [line("VHD-base", 8, hidden=1),
                                          line("VHD-leaf", 12, "VHD-base"), raw_error,
                                          line("VHD-leaf2", 6, "VHD-base")])
    assert ours(capsys, "-l", vg, "-m", "*")[0] == 22
    rc, out = ours(capsys, "-l", vg, "-p", "-c", "-m", "VHD-*")
    assert (rc, out.splitlines()) == (0, [line("VHD-base", 8, hidden=1),
                                          line("VHD-leaf", 12, "VHD-base", indent=3),
                                          line("VHD-leaf2", 6, "VHD-base", indent=3)])
    rc, out = ours(capsys, "-l", vg, "-a", "VHD-leaf")
    assert (rc, out.splitlines()) == (0, [line("VHD-leaf", 12, "VHD-base"),
                                          line("VHD-base", 8, hidden=1)])
    assert ours(capsys, "-l", "VG_nowhere", "-m", "*") == (22, "")
    for args in (["-c", "-m", "*"], ["-m", "*"], ["-p", "-c", "-m", "*"], ["-f", "-m", "VHD-*"],
                 ["-a", "VHD-leaf2"], ["-p", "-a", "VHD-leaf"], ["-M", "-m", "VHD-*"],
                 ["-m", "VHD-leaf", "VHD-*"], ["-m", "+(VHD|LV)-@(base|raw)"],
                 ["nomatch"]):
        want = theirs("-l", vg, *args)
        if want is not None:
            assert ours(capsys, "-l", vg, *args) == want, args
    # A volume whose footer puts its header past the volume's end, where a valid header
    # lies: refused, never read from beyond (blktap reads on, into what follows).
    _lvm(env, "lvcreate", "-q", "-an", "-Zn", "-L", "4m", "-n", "VHD-evil", vg)
    footer = vhd.Footer.unpack(leaf.read_bytes()[:512], leaf, "copy")
    evil = tmp_path / "evil"
    evil.write_bytes(dataclasses.replace(footer, data_offset=4 * MiB).pack())
    start = _put(env, vg, dev, "VHD-evil", evil)
    with open(dev, "r+b") as f:
        f.seek(start + 4 * MiB)
        f.write(leaf.read_bytes()[512:1536])
    assert ours(capsys, "-l", vg, "-m", "VHD-evil") == (
        22, "vhd=VHD-evil scan-error=-22 error-message='reading header'\n")
