"""Permission strings (docs/misc/xenstore.txt): parse, format, who may read/write."""

from __future__ import annotations

import pytest

from blktap3.xenbus import Access, Permission, owned_by
from blktap3.xenbus.perms import can_read, can_write, format_perms, parse_perms


@pytest.mark.parametrize(
    ("text", "domid", "access"),
    [("n0", 0, Access.NONE), ("r5", 5, Access.READ), ("w12", 12, Access.WRITE),
     ("b65535", 65535, Access.BOTH)],
)
def test_wire_strings_parse_and_format_back(text: str, domid: int, access: Access) -> None:
    perm = Permission.parse(text)
    assert perm == Permission(domid, access)
    assert str(perm) == text


@pytest.mark.parametrize("text", ["", "x5", "r", "r-1", "r 5", "R5", "r65536", "r5x", "5r",
                                  "r999999"])
def test_bad_wire_strings_raise(text: str) -> None:
    with pytest.raises(ValueError):
        Permission.parse(text)


def test_libxl_backend_dir_perms() -> None:
    # back-end directory: owned by the back-end domain, readable by the guest.
    perms = owned_by(0, readers=[5])
    assert format_perms(perms) == ["n0", "r5"]
    assert can_read(perms, 5) and not can_write(perms, 5)
    assert can_read(perms, 0) and can_write(perms, 0)
    assert not can_read(perms, 6)


def test_first_entry_is_the_default_for_unlisted_domains() -> None:
    perms = parse_perms(["r5", "n7"])
    assert can_read(perms, 3)
    assert not can_read(perms, 7)
    assert can_write(perms, 5), "the owner may always write"


def test_reader_and_writer_gets_both() -> None:
    assert format_perms(owned_by(5, readers=[0], writers=[0, 9])) == ["n5", "b0", "w9"]


def test_empty_lists_are_refused() -> None:
    with pytest.raises(ValueError):
        parse_perms([])
    with pytest.raises(ValueError):
        format_perms([])


def test_string_entries_are_validated_not_trusted() -> None:
    assert format_perms(["n0", Permission(3, Access.READ)]) == ["n0", "r3"]
    with pytest.raises(ValueError):
        format_perms(["n0", "r3\0w4"])
