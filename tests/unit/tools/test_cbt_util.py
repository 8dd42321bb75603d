"""cbt-util against blktap's CBT log layout (include/cbt-util.h, cbt/cbt-util.c v4.0.8):
48 bytes of `struct cbt_log_metadata` (parent and child uuid_t, an int flag, 4 bytes of
padding, a u64 disk size in bytes), then one bit per 64 KiB block, read here byte by byte
rather than through our own format module; its outputs, exit codes and usage."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

MiB = 1 << 20
CBT_UTIL = str(Path(sys.executable).parent / "cbt-util")


def cbt_util(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([CBT_UTIL, *args], capture_output=True, timeout=60)


def create(path: Path, size: int) -> Path:
    assert cbt_util("create", "-n", str(path), "-s", str(size)).returncode == 0
    return path


def test_cbt_util_reads_and_sets_what_blktaps_layout_holds(tmp_path: Path) -> None:
    log = create(tmp_path / "a.cbt", 10 * MiB + 1)
    data = log.read_bytes()
    assert len(data) == 48 + (161 + 7) // 8  # 161 blocks of 64 KiB
    assert data[:48] == bytes(40) + (10 * MiB + 1).to_bytes(8, "little")
    parent, child = uuid.uuid4(), uuid.uuid4()
    assert cbt_util("set", "-n", str(log), "-p", str(parent), "-c", str(child),
                    "-f", "1").returncode == 0
    data = log.read_bytes()
    assert data[:16] == parent.bytes and data[16:32] == child.bytes
    assert data[32:36] == (1).to_bytes(4, "little")
    assert cbt_util("get", "-n", str(log), "-p").stdout == f"{parent}\n".encode()
    assert cbt_util("get", "-n", str(log), "-c").stdout == f"{child}\n".encode()
    assert cbt_util("get", "-n", str(log), "-f").stdout == b"1\n"
    assert cbt_util("get", "-n", str(log), "-s").stdout == f"{10 * MiB + 1}\n".encode()
    # Growing keeps the bits and adds zeroes; shrinking is refused.
    with open(log, "r+b") as f:
        f.seek(48)
        f.write(b"\x81")
    assert cbt_util("set", "-n", str(log), "-s", str(20 * MiB)).returncode == 0
    assert cbt_util("get", "-n", str(log), "-b").stdout == b"\x81" + bytes(39)
    small = cbt_util("set", "-n", str(log), "-s", str(MiB))
    assert small.returncode == 22 and b"Size smaller than current file size" in small.stderr
    # coalesce: child |= parent.
    other = create(tmp_path / "b.cbt", 20 * MiB)
    with open(other, "r+b") as f:
        f.seek(48 + 2)
        f.write(b"\x10")
    assert cbt_util("coalesce", "-p", str(other), "-c", str(log)).returncode == 0
    assert cbt_util("get", "-n", str(log), "-b").stdout == b"\x81\x00\x10" + bytes(37)
    assert cbt_util("coalesce", "-p", str(log), "-c", str(create(tmp_path / "c.cbt", MiB)))\
        .returncode == 22


@pytest.mark.parametrize("args", [
    [], ["get"], ["get", "-n", "x"], ["get", "-n", "x", "-p", "-c"], ["create", "-n", "x"],
    ["set", "-n", "x"], ["set", "-n", "x", "-f", "2"], ["coalesce", "-p", "x"],
    ["create", "-n", "x", "-s", "12abc"]])
def test_cbt_util_bad_options_print_usage_and_exit_22(args: list[str], tmp_path: Path) -> None:
    done = subprocess.run([CBT_UTIL, *args], capture_output=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 22
    assert b"usage: cbt-util" in done.stdout or b"Options:" in done.stdout
    assert not (tmp_path / "x").exists()


def test_cbt_util_errors_are_one_line(tmp_path: Path) -> None:
    missing = cbt_util("get", "-n", str(tmp_path / "none"), "-s")
    assert missing.returncode == 2 and missing.stderr.count(b"\n") == 1
    assert b"Failed to open log file" in missing.stderr
    bad = cbt_util("set", "-n", str(create(tmp_path / "a.cbt", MiB)), "-p", "not-a-uuid")
    assert bad.returncode == 22 and b"Invalid UUID" in bad.stderr
    unknown = cbt_util("frob")
    assert unknown.returncode == 0 and b"Invalid COMMAND frob" in unknown.stderr
