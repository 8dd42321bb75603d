"""The raw and null image drivers and both io engines, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blktap3.abi import VdiskInfo
from blktap3.datapath import Image


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with p.open("wb") as f:
        f.truncate(1 << 20)
    return p


def test_raw_image_reports_size_in_512_byte_sectors_and_o_direct(disk: Path) -> None:
    img = Image.open("aio", str(disk))
    try:
        assert img.info.sectors == (1 << 20) // 512
        assert img.info.sector_size == 512
        assert img.info.physical_sector_size >= 512
        assert img.info.o_direct  # ext4 under tmp_path takes O_DIRECT here
        assert img.info.discard
        assert img.info.info & VdiskInfo.READONLY == 0
    finally:
        img.close()


def test_o_direct_off_when_not_asked(disk: Path) -> None:
    img = Image.open("raw", str(disk), o_direct=False)
    assert not img.info.o_direct
    img.close()


@pytest.mark.parametrize("engine", ["uring", "sync"])
def test_engines_write_and_read_back_at_the_right_offset(disk: Path, engine: str) -> None:
    img = Image.open("aio", str(disk))
    data = os.urandom(4096 * 3)
    img.write(24, data, engine=engine)
    assert img.read(24, 24, engine=engine) == data
    img.close()
    assert disk.read_bytes()[24 * 512 : 24 * 512 + len(data)] == data


def test_readonly_image_refuses_writes_and_says_so(disk: Path) -> None:
    img = Image.open("aio", str(disk), readonly=True)
    assert img.info.info & VdiskInfo.READONLY
    assert not img.info.discard
    with pytest.raises(OSError) as exc:
        img.write(0, bytes(512))
    assert exc.value.errno == 30  # EROFS
    img.close()


def test_io_past_the_end_is_refused(disk: Path) -> None:
    img = Image.open("aio", str(disk))
    with pytest.raises(OSError) as exc:
        img.read(img.info.sectors - 1, 2)
    assert exc.value.errno == 34  # ERANGE
    img.close()


def test_missing_file_and_unknown_driver_raise_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError) as exc:
        Image.open("aio", str(tmp_path / "nope"))
    assert exc.value.errno == 2
    with pytest.raises(OSError) as exc:
        Image.open("vhdx", str(tmp_path / "nope"))
    assert exc.value.errno == 22


def test_null_image_is_large_and_has_no_storage() -> None:
    img = Image.open("null", "")
    assert img.info.sectors >= 1 << 31
    assert not img.info.o_direct and not img.info.discard
    img.close()
