"""The toolstack's parsing of what a user types: domids, device names, images."""

from __future__ import annotations

from pathlib import Path

import pytest

from blktap3.sim.toolstack import Image, ToolstackError, device_name, parse_devid, parse_domid


@pytest.mark.parametrize(("name", "number"), [
    ("xvda", 51712), ("xvdb", 51728), ("xvdp", 51952),
    ("xvdq", (1 << 28) | (16 << 8)), ("xvdaa", (1 << 28) | (26 << 8)),
    ("51712", 51712), ("768", 768),
])
def test_devid_follows_the_xen_vbd_interface_numbering(name: str, number: int) -> None:
    assert parse_devid(name) == number
    if name.startswith("xvd"):
        assert device_name(number) == name


@pytest.mark.parametrize("bad", ["", "sda", "xvd", "xvdA", "xvd1", "-1", "1e3", "xvdabc"])
def test_bad_device_names_are_refused(bad: str) -> None:
    with pytest.raises(ToolstackError, match="bad device"):
        parse_devid(bad)


@pytest.mark.parametrize("bad", ["0", "-1", "01", "x", "32752", "1.0", ""])
def test_bad_domids_are_refused(bad: str) -> None:
    with pytest.raises(ToolstackError, match="bad domid"):
        parse_domid(bad)


def test_image_defaults_to_aio_and_resolves(tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    assert Image.parse(str(disk)).params == f"aio:{disk}"
    assert Image.parse(f"raw:{disk}").params == f"raw:{disk}"
    assert Image.parse(f"vhd:{disk}").params == f"vhd:{disk}"


@pytest.mark.parametrize("text", ["vhdx:/x", "qcow2:/x"])
def test_unknown_image_drivers_are_refused(text: str) -> None:
    with pytest.raises(ToolstackError, match="driver"):
        Image.parse(text, must_exist=False)


def test_missing_and_directory_images_are_refused(tmp_path: Path) -> None:
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(ToolstackError, match="is not a file"):
            Image.parse(str(path))
