"""`blktap3.abi` against Xen's own headers (libxen-dev), the oracle none of us wrote."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import blktap3
from blktap3.abi import (
    MAX_INDIRECT_SEGMENTS,
    MAX_RING_PAGE_ORDER,
    SECTOR_SIZE,
    BlkifProtocol,
    BlkifStatus,
    VdiskInfo,
    XenbusState,
)

XEN_IO = Path("/usr/include/xen/io")


def _header(name: str) -> str:
    path = XEN_IO / name
    if not path.exists():
        pytest.skip(f"{path} missing (libxen-dev)")
    return path.read_text()


def test_xenbus_states_are_xenbus_h() -> None:
    found = dict(re.findall(r"XenbusState(\w+)\s*=\s*(\d+)", _header("xenbus.h")))
    ours = {s.name.replace("_", "").lower(): s.value for s in XenbusState}
    assert {k.lower(): int(v) for k, v in found.items()} == ours


def test_vdisk_bits_are_blkif_h() -> None:
    found = dict(re.findall(r"#define VDISK_(\w+)\s+(0x[0-9a-fA-F]+)", _header("blkif.h")))
    assert {k: int(v, 16) for k, v in found.items()} == {b.name: b.value for b in VdiskInfo}


def test_protocol_names_are_protocols_h() -> None:
    found = dict(re.findall(r'#define XEN_IO_PROTO_ABI_(X86_\d+)\s+"([^"]+)"',
                            _header("protocols.h")))
    for name, value in found.items():
        assert BlkifProtocol[name].xenstore == value
        assert BlkifProtocol.from_xenstore(value) is BlkifProtocol[name]
    assert BlkifProtocol.from_xenstore("arm-abi") is None  # not a layout we serve
    assert BlkifProtocol.from_xenstore(None) is BlkifProtocol.NATIVE  # key missing
    assert BlkifProtocol.from_xenstore("native") is None  # no such name (blkback agrees)
    assert BlkifProtocol.NATIVE.xenstore is None


def test_protocol_numbers_are_the_c_constants() -> None:
    from blktap3.datapath._datapath import lib

    for proto in BlkifProtocol:
        assert getattr(lib, f"TD_PROTO_{proto.name}") == proto.value
    # The VDISK_* bits the C data path sets come from blkif.h: the same as ours.
    assert (lib.VDISK_CDROM, lib.VDISK_READONLY) == (VdiskInfo.CDROM, VdiskInfo.READONLY)
    for status in BlkifStatus:  # the response statuses the ring service writes
        assert getattr(lib, f"BLKIF_RSP_{status.name}") == status.value
    assert BlkifProtocol.from_wire(0) is BlkifProtocol.NATIVE  # "not said"
    assert BlkifProtocol.from_wire(4) is None


def test_ring_order_is_the_c_data_paths() -> None:
    from blktap3.datapath._datapath import lib

    assert lib.TD_MAX_RING_ORDER == MAX_RING_PAGE_ORDER == 4  # blkback's and QEMU's
    assert lib.TD_MAX_INDIRECT_SEGS == MAX_INDIRECT_SEGMENTS == 4096


def test_sector_is_blkif_h_shift() -> None:
    # blkif.h: "sector_number" counts 512-byte sectors whatever `sector-size` says.
    assert SECTOR_SIZE == 1 << 9


@pytest.mark.parametrize("raw", ["4", "0", "8"])
def test_state_from_wire_takes_canonical_numbers(raw: str) -> None:
    assert XenbusState.from_wire(raw) == int(raw)


@pytest.mark.parametrize("raw", ["9", "04", "+4", " 4", "4 ", "", "0x4", "four"])
def test_state_from_wire_refuses_anything_else(raw: str) -> None:
    assert XenbusState.from_wire(raw) is None


def test_no_room_defines_an_abi_table_of_its_own() -> None:
    """Each Xen table exists once: no module but abi.py spells a protocol name, a VDISK_*
    constant, a sector-size constant or a xenbus-state enum."""
    root = Path(blktap3.__file__).parent
    tools = root.parent / "tools"
    offenders = []
    for path in [*root.rglob("*.py"), *tools.rglob("*.py")]:
        if path.name == "abi.py" or "_datapath" in path.name or "_guestdrv" in path.name:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in {"x86_32-abi", "x86_64-abi"}:
                offenders.append(f"{path.name}:{node.lineno} protocol name")
            elif isinstance(node, ast.ClassDef) and node.name in {"XenbusState", "BlkifProtocol"}:
                offenders.append(f"{path.name}:{node.lineno} class {node.name}")
        for node in tree.body:  # module-level constants
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                name = target.id if isinstance(target, ast.Name) else ""
                if name.startswith("VDISK_") or name in {"SECTOR", "SECTOR_SIZE"}:
                    offenders.append(f"{path.name}:{node.lineno} {name}")
    assert offenders == []
