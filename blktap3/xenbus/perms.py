"""XenStore node permissions as typed values (docs/misc/xenstore.txt, "Permissions").

On the wire a node's permissions are a list of strings `<access><domid>`, access one of
`n` (none), `r` (read), `w` (write), `b` (both). The FIRST entry names the node's owner
(who may always do everything) and, by its access letter, what every domain not listed
later may do. Later entries grant a specific domain an access. So `["n0", "r5"]` is
"owned by dom0, domain 5 may read, nobody else may".
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Domain ids are 16-bit in Xen; xenstored parses with strtoul, so bound them ourselves.
_PERM_RE = re.compile(r"\A([nrwb])(\d{1,5})\Z")
DOMID_MAX = 0xFFFF


class Access(enum.Enum):
    """The access letter of a permission entry."""

    NONE = "n"
    READ = "r"
    WRITE = "w"
    BOTH = "b"

    @property
    def can_read(self) -> bool:
        return self in (Access.READ, Access.BOTH)

    @property
    def can_write(self) -> bool:
        return self in (Access.WRITE, Access.BOTH)


@dataclass(frozen=True, slots=True)
class Permission:
    """One permission entry: `domid` gets `access` (for the first entry: owner + default)."""

    domid: int
    access: Access

    def __post_init__(self) -> None:
        if not 0 <= self.domid <= DOMID_MAX:
            raise ValueError(f"domid {self.domid} out of range 0..{DOMID_MAX}")

    @classmethod
    def parse(cls, text: str) -> Permission:
        """Parse a wire string like `r5`; `ValueError` names the bad string."""
        match = _PERM_RE.match(text)
        if match is None:
            raise ValueError(f"bad XenStore permission {text!r}")
        domid = int(match.group(2))
        if domid > DOMID_MAX:
            raise ValueError(f"bad XenStore permission {text!r}: domid out of range")
        return cls(domid, Access(match.group(1)))

    def __str__(self) -> str:
        return f"{self.access.value}{self.domid}"


def owned_by(
    owner: int,
    others: Access = Access.NONE,
    readers: Iterable[int] = (),
    writers: Iterable[int] = (),
) -> list[Permission]:
    """A permission list: `owner` owns the node, listed domains read/write, the rest `others`.

    A domain in both `readers` and `writers` gets `b`.
    """
    grants: dict[int, Access] = {}
    for domid in readers:
        grants[domid] = Access.READ
    for domid in writers:
        grants[domid] = Access.BOTH if grants.get(domid) is Access.READ else Access.WRITE
    return [Permission(owner, others)] + [Permission(d, a) for d, a in grants.items()]


def parse_perms(entries: Sequence[str]) -> list[Permission]:
    """Parse a node's permission list as GET_PERMS returns it (at least the owner entry)."""
    if not entries:
        raise ValueError("empty XenStore permission list")
    return [Permission.parse(e) for e in entries]


def format_perms(perms: Sequence[Permission | str]) -> list[str]:
    """Wire strings for a permission list; strings are validated, not trusted."""
    if not perms:
        raise ValueError("empty XenStore permission list")
    return [str(p if isinstance(p, Permission) else Permission.parse(p)) for p in perms]


def can_read(perms: Sequence[Permission], domid: int) -> bool:
    """Whether `domid` may read a node with these permissions (dom0 is not special here)."""
    return _access_of(perms, domid).can_read or perms[0].domid == domid


def can_write(perms: Sequence[Permission], domid: int) -> bool:
    """Whether `domid` may write a node with these permissions."""
    return _access_of(perms, domid).can_write or perms[0].domid == domid


def _access_of(perms: Sequence[Permission], domid: int) -> Access:
    for perm in perms[1:]:
        if perm.domid == domid:
            return perm.access
    return perms[0].access
