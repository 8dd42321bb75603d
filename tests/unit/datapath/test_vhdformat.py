"""The VHD format module: images qemu-img made parse; damaged images are refused at open
with a message naming the fault, never read past."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from blktap3.datapath import vhdformat as vhd
from tests.support.tools import run_tool

MiB = 1 << 20
needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-utils missing")


def qemu_vhd(path: Path, size: str, subformat: str) -> Path:
    run_tool("qemu-img", "create", "-q", "-f", "vpc", "-o",
             f"subformat={subformat},force_size=on", path, size)
    return path


@needs_qemu
@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_qemu_images_parse_with_their_size_and_type(tmp_path: Path, subformat: str) -> None:
    layer = vhd.Layer.open(qemu_vhd(tmp_path / "q.vhd", "64M", subformat))
    assert layer.sectors == 64 * MiB // 512
    assert layer.footer.disk_type == (vhd.DiskType.FIXED if subformat == "fixed"
                                      else vhd.DiskType.DYNAMIC)


@needs_qemu
def test_our_dynamic_image_is_what_qemu_img_reads(tmp_path: Path) -> None:
    vhd.create(tmp_path / "ours.vhd", 10 * MiB)
    info = run_tool("qemu-img", "info", "-f", "vpc", "--output=json",
                    tmp_path / "ours.vhd").stdout
    assert '"virtual-size": 10485760' in info


def test_a_snapshot_names_its_parent_and_takes_its_size(tmp_path: Path) -> None:
    base = vhd.create(tmp_path / "base.vhd", 8 * MiB)
    child = vhd.create(tmp_path / "child.vhd", 0, parent=tmp_path / "base.vhd")
    assert child.is_diff and child.sectors == base.sectors
    assert child.parent_names() == ["./base.vhd", "./base.vhd", "./base.vhd"]
    chain = vhd.open_chain(tmp_path / "child.vhd")
    assert [layer.path.name for layer in chain] == ["child.vhd", "base.vhd"]


def _poke(path: Path, off: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(off)
        f.write(data)


def _refix_header(path: Path, layer: vhd.Layer, **changes: object) -> None:
    """Rewrite the header with `changes` and a correct checksum (a well-formed lie)."""
    from dataclasses import replace
    assert layer.header is not None
    _poke(path, layer.footer.data_offset, replace(layer.header, **changes).pack())


def _bat_entry(path: Path, layer: vhd.Layer, blk: int, value: int) -> None:
    assert layer.header is not None
    _poke(path, layer.header.table_offset + 4 * blk, struct.pack(">I", value))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "d.vhd"
    vhd.create(p, 8 * MiB)
    return p


def test_truncated_file_is_refused(image: Path) -> None:
    with image.open("r+b") as f:
        f.truncate(image.stat().st_size - 100)
    with pytest.raises(vhd.VhdError, match="no VHD footer at the end"):
        vhd.Layer.open(image)


def test_short_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.vhd").write_bytes(b"conectix")
    with pytest.raises(vhd.VhdError, match="too short"):
        vhd.Layer.open(tmp_path / "s.vhd")


def test_footer_checksum_mismatch_is_refused(image: Path) -> None:
    _poke(image, image.stat().st_size - 512 + 48, struct.pack(">Q", 4 * MiB))
    with pytest.raises(vhd.VhdError, match="footer at the end: checksum"):
        vhd.Layer.open(image)


def test_header_checksum_mismatch_is_refused(image: Path) -> None:
    _poke(image, 512 + 28, struct.pack(">I", 99))
    with pytest.raises(vhd.VhdError, match="header checksum"):
        vhd.Layer.open(image)


def test_bat_entry_past_the_end_is_refused(image: Path) -> None:
    layer = vhd.Layer.open(image)
    _bat_entry(image, layer, 1, image.stat().st_size // 512)
    with pytest.raises(vhd.VhdError, match=r"BAT entry 1: block at .* runs past the end"):
        vhd.Layer.open(image)


def test_bat_entry_into_the_metadata_is_refused(image: Path) -> None:
    layer = vhd.Layer.open(image)
    with image.open("r+b") as f:  # room for a block, so only the overlap is wrong
        f.truncate(image.stat().st_size + 3 * MiB)
    _poke(image, image.stat().st_size - 512, layer.footer.pack())
    _bat_entry(image, layer, 0, 1)      # sector 1: the header
    with pytest.raises(vhd.VhdError, match="overlaps block 0"):
        vhd.Layer.open(image)


def test_overlapping_blocks_are_refused(image: Path) -> None:
    layer = vhd.Layer.open(image)
    end = image.stat().st_size - 512
    with image.open("r+b") as f:
        f.truncate(end + 5 * MiB)
    _poke(image, end + 5 * MiB - 512, layer.footer.pack())
    _bat_entry(image, layer, 0, end // 512)
    _bat_entry(image, layer, 1, end // 512 + 8)
    with pytest.raises(vhd.VhdError, match=r"block 0 at .* overlaps block 1"):
        vhd.Layer.open(image)


def test_a_bat_too_small_for_the_disk_is_refused(image: Path) -> None:
    _refix_header(image, vhd.Layer.open(image), max_table_entries=2)
    with pytest.raises(vhd.VhdError, match="cannot map"):
        vhd.Layer.open(image)


def test_block_size_blktap_cannot_open_is_refused(image: Path) -> None:
    _refix_header(image, vhd.Layer.open(image), block_size=3 * MiB)
    with pytest.raises(vhd.VhdError, match="unsupported block size"):
        vhd.Layer.open(image)


def test_size_beyond_vhds_limit_is_refused(tmp_path: Path) -> None:
    with pytest.raises(vhd.VhdError, match="2040 GiB"):
        vhd.create(tmp_path / "big.vhd", vhd.MAX_SIZE + 2 * MiB)
    assert not (tmp_path / "big.vhd").exists()


def test_parent_chain_loop_is_refused(tmp_path: Path) -> None:
    vhd.create(tmp_path / "a.vhd", 4 * MiB)
    vhd.create(tmp_path / "b.vhd", 0, parent=tmp_path / "a.vhd")
    vhd.create(tmp_path / "c.vhd", 0, parent=tmp_path / "b.vhd")
    # c takes a's place as b's parent, UUID and all: b -> c -> b -> ...
    (tmp_path / "a.vhd").unlink()
    (tmp_path / "c.vhd").rename(tmp_path / "a.vhd")
    c = vhd.Layer.open(tmp_path / "a.vhd")
    _refix_header(tmp_path / "b.vhd", vhd.Layer.open(tmp_path / "b.vhd"),
                  parent_uuid=c.footer.uuid)
    with pytest.raises(vhd.VhdError, match="parent chain loops back") as exc:
        vhd.open_chain(tmp_path / "b.vhd")
    assert exc.value.errno == 40


def test_parent_with_another_uuid_is_refused(tmp_path: Path) -> None:
    vhd.create(tmp_path / "a.vhd", 4 * MiB)
    vhd.create(tmp_path / "b.vhd", 0, parent=tmp_path / "a.vhd")
    (tmp_path / "a.vhd").unlink()
    vhd.create(tmp_path / "a.vhd", 4 * MiB)  # same name, new disk
    with pytest.raises(vhd.VhdError, match=r"has UUID .* the child expects"):
        vhd.open_chain(tmp_path / "b.vhd")


def test_parent_larger_than_child_is_refused(tmp_path: Path) -> None:
    vhd.create(tmp_path / "a.vhd", 4 * MiB)
    child = vhd.create(tmp_path / "b.vhd", 0, parent=tmp_path / "a.vhd")
    from dataclasses import replace
    small = replace(child.footer, current_size=2 * MiB).pack()
    _poke(tmp_path / "b.vhd", 0, small)
    _poke(tmp_path / "b.vhd", child.footer_offset, small)
    with pytest.raises(vhd.VhdError, match="is larger"):
        vhd.open_chain(tmp_path / "b.vhd")


def test_missing_parent_is_enoent(tmp_path: Path) -> None:
    vhd.create(tmp_path / "a.vhd", 4 * MiB)
    vhd.create(tmp_path / "b.vhd", 0, parent=tmp_path / "a.vhd")
    (tmp_path / "a.vhd").unlink()
    with pytest.raises(vhd.VhdError, match=r"parent ./a.vhd not found") as exc:
        vhd.open_chain(tmp_path / "b.vhd")
    assert exc.value.errno == 2


def test_hidden_flag_is_set_in_both_footers(image: Path) -> None:
    vhd.set_hidden(image, 1)
    layer = vhd.Layer.open(image)
    assert layer.hidden == 1
    assert vhd.Footer.unpack(image.read_bytes()[:512], image, "copy").hidden == 1
