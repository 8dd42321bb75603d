"""xensim grant tables: what Xen's map and copy paths allow, with their errors."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from blktap3.sim import xensim
from blktap3.sim.xenlib import GrantShare, Share

from .conftest import Probe, probe_env

GNTST_OKAY = 0
GNTST_GENERAL_ERROR = -1
GNTST_BAD_DOMAIN = -2
GNTST_BAD_GNTREF = -3


def share_one(machine: xensim.Machine, owner: int, grantee: int, writable: bool,
              first_byte: int) -> tuple[GrantShare, Share]:
    gs = GrantShare(machine.run_dir, owner)
    share = gs.share_pages(grantee, 1, writable=writable)
    assert share.buffer is not None
    share.buffer[0] = first_byte
    return gs, share


def dom1_shares_with_dom2(machine: xensim.Machine, writable: bool,
                          first_byte: int) -> tuple[GrantShare, Share]:
    """Domains 1, 2 and 3; one page of domain 1 granted to domain 2."""
    for domid in (1, 2, 3):
        machine.create_domain(domid, 64)
    return share_one(machine, 1, 2, writable, first_byte)


def test_grant_maps_only_for_the_domain_it_was_granted_to(machine: xensim.Machine,
                                                          probe: Probe) -> None:
    gs, share = dom1_shares_with_dom2(machine, True, 0xAB)
    with gs:
        ref = share.refs[0]
        assert probe(2, "map", 1, ref, "rw").splitlines() == ["ok ab", "unmap 0"]
        assert share.buffer is not None
        assert share.buffer[1] == 0x5A, "the grantee's write reached the granter"
        assert probe(3, "map", 1, ref, "rw") == f"err {errno.EINVAL}"
        assert probe(3, "map", 1, ref, "ro") == f"err {errno.EINVAL}"


def test_read_only_grant_refuses_writable_map_and_copy_into(machine: xensim.Machine,
                                                            probe: Probe) -> None:
    machine.create_domain(1, 64)
    machine.create_domain(2, 64)
    gs, share = share_one(machine, 1, 2, False, 0x11)
    with gs:
        ref = share.refs[0]
        assert probe(2, "map", 1, ref, "rw") == f"err {errno.EINVAL}"
        assert probe(2, "map", 1, ref, "ro").splitlines()[0] == "ok 11"
        assert probe(2, "copy-to", 1, ref) == f"status {GNTST_GENERAL_ERROR} c3"
        assert probe(2, "copy-from", 1, ref) == f"status {GNTST_OKAY} 11"
        assert share.buffer is not None
        assert bytes(share.buffer[2:18]) == bytes(16), "nothing was copied in"


def test_grant_copy_only_for_the_grantee(machine: xensim.Machine, probe: Probe) -> None:
    gs, share = dom1_shares_with_dom2(machine, True, 0x42)
    with gs:
        ref = share.refs[0]
        assert probe(3, "copy-from", 1, ref) == f"status {GNTST_GENERAL_ERROR} c3"
        assert probe(3, "copy-to", 1, ref) == f"status {GNTST_GENERAL_ERROR} c3"
        assert share.buffer is not None
        assert bytes(share.buffer[:19]) == b"\x42" + bytes(18), "dom3 changed nothing"
        assert probe(2, "copy-from", 1, ref) == f"status {GNTST_OKAY} 42"
        assert probe(2, "copy-to", 1, ref) == f"status {GNTST_OKAY} c3"
        assert bytes(share.buffer[:19]) == b"\x42\x00" + b"\xc3" * 16 + b"\x00"


def test_the_gntdev_node_copies_as_the_library_does(machine: xensim.Machine,
                                                    probe: Probe) -> None:
    # blktap's tapdisk copies through /dev/xen/gntdev itself (drivers/td-req.c): the
    # node answers its ioctl with the library's checks, and nothing else.
    gs, share = dom1_shares_with_dom2(machine, False, 0x42)
    with gs:
        ref = share.refs[0]
        enotty = f"other ioctl {errno.ENOTTY}"
        assert probe(2, "node-copy-from", 1, ref).splitlines() == [
            f"status {GNTST_OKAY} 42", enotty, "close 0"]
        assert probe(2, "node-copy-to", 1, ref).splitlines()[0] == (
            f"status {GNTST_GENERAL_ERROR} c3"), "a read-only grant refuses a copy into it"
        assert probe(3, "node-copy-from", 1, ref).splitlines()[0] == (
            f"status {GNTST_GENERAL_ERROR} c3"), "only the grantee copies"
        assert probe(2, "node-copy-from", 9, 8).splitlines()[0] == f"status {GNTST_BAD_DOMAIN} c3"


def test_there_is_no_gntdev_node_without_a_machine(probe_binary: Path, tmp_path: Path) -> None:
    env = {**os.environ, **xensim.process_env(tmp_path / "none", 2)}
    out = subprocess.run([str(probe_binary), "node-copy-from", "1", "8"], env=env,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.strip() == f"no node {errno.ENOENT}"


def test_unknown_or_unused_grant_refs_and_domains_fail(machine: xensim.Machine,
                                                       probe: Probe) -> None:
    machine.create_domain(1, 64)
    machine.create_domain(2, 64)
    assert probe(2, "map", 1, 4000, "ro") == f"err {errno.EINVAL}"
    assert probe(2, "map", 9, 8, "ro") == f"err {errno.EINVAL}"
    assert probe(2, "copy-from", 1, 4000) == f"status {GNTST_GENERAL_ERROR} c3"
    assert probe(2, "copy-from", 1, 1 << 20) == f"status {GNTST_BAD_GNTREF} c3"
    assert probe(2, "copy-from", 9, 8) == f"status {GNTST_BAD_DOMAIN} c3"


def test_unshare_revokes_the_grant(machine: xensim.Machine, probe: Probe) -> None:
    machine.create_domain(1, 64)
    machine.create_domain(2, 64)
    gs, share = share_one(machine, 1, 2, True, 0x01)
    ref = share.refs[0]
    assert probe(2, "map", 1, ref, "ro").splitlines()[0] == "ok 01"
    gs.close()
    assert probe(2, "map", 1, ref, "ro") == f"err {errno.EINVAL}"


def test_xenstore_page_is_granted_to_dom0_by_the_reserved_ref(machine: xensim.Machine,
                                                              probe: Probe) -> None:
    info = machine.create_domain(5, 64)
    assert info.xenstore_mfn == xensim.XENSTORE_PFN
    assert probe(0, "map", 5, xensim.GNTTAB_RESERVED_XENSTORE, "rw").splitlines()[0] == "ok 00"
    assert probe(3, "map", 5, xensim.GNTTAB_RESERVED_XENSTORE, "rw") == f"err {errno.EINVAL}"


def test_sharing_fails_when_the_domain_memory_is_full(machine: xensim.Machine) -> None:
    machine.create_domain(1, 4)  # pfn 0 and the xenstore page are taken
    with GrantShare(machine.run_dir, 1) as gs:
        gs.share_pages(2, 2)
        with pytest.raises(OSError) as exc:
            gs.share_pages(2, 1)
        assert exc.value.errno == errno.ENOMEM


def test_pages_shared_by_a_dead_process_are_reclaimed(machine: xensim.Machine,
                                                      probe: Probe) -> None:
    machine.create_domain(1, 4)  # two free pages
    code = textwrap.dedent(f"""
        import os
        from blktap3.sim.xenlib import GrantShare
        share = GrantShare({str(machine.run_dir)!r}, 1).share_pages(2, 2)
        print(share.refs[0], flush=True)
        os._exit(0)  # no unshare: the kernel would end the grants
    """)
    ref = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, timeout=30).stdout)
    with GrantShare(machine.run_dir, 1) as gs:
        share = gs.share_pages(3, 2)
        assert len(share.refs) == 2
    assert probe(2, "map", 1, ref, "ro") == f"err {errno.EINVAL}", "the dead grant ended"


class Held:
    """A probe process (as domain `domid`) holding a grant mapping until released."""

    def __init__(self, probe_binary: Path, machine: xensim.Machine, domid: int,
                 granter: int, ref: int, mode: str) -> None:
        self.proc = subprocess.Popen(
            [str(probe_binary), "hold", str(granter), str(ref), mode],
            env=probe_env(machine, domid), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        assert self.proc.stdout is not None
        self.first = self.proc.stdout.readline().strip()

    def release(self) -> list[str]:
        out, _ = self.proc.communicate(timeout=30)
        return out.split()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.communicate(timeout=30)


def test_a_mapped_grant_cannot_be_ended_until_it_is_unmapped(
        machine: xensim.Machine, probe: Probe, probe_binary: Path) -> None:
    machine.create_domain(1, 64)
    machine.create_domain(2, 64)
    for writable, mode in ((True, "rw"), (False, "ro")):
        gs, share = share_one(machine, 1, 2, writable, 0x77)
        with gs:
            ref = share.refs[0]
            held = Held(probe_binary, machine, 2, 1, ref, mode)
            assert held.first == "ok 77"
            with pytest.raises(OSError) as exc:
                gs.end_access(ref)
            assert exc.value.errno == errno.EBUSY, "Linux: end_foreign_access_ref fails"
            assert held.release() == ["still", "77", "unmap", "0"]
            gs.end_access(ref)  # unmapping freed it
            assert probe(2, "map", 1, ref, "ro") == f"err {errno.EINVAL}", "ended"
            assert probe(2, "copy-from", 1, ref) == f"status {GNTST_GENERAL_ERROR} c3"


def test_a_guest_ends_only_grants_of_its_own_shares(machine: xensim.Machine) -> None:
    machine.create_domain(1, 64)
    with GrantShare(machine.run_dir, 1) as gs:
        with pytest.raises(OSError) as exc:
            gs.end_access(xensim.GNTTAB_RESERVED_XENSTORE)
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(OSError) as exc:
            gs.end_access(1 << 20)
        assert exc.value.errno == errno.EINVAL


def test_unsharing_a_mapped_page_frees_it_at_the_last_unmap(
        machine: xensim.Machine, probe_binary: Path) -> None:
    machine.create_domain(1, 4)  # pfn 0 and the xenstore page taken: two free
    machine.create_domain(2, 64)
    gs, share = share_one(machine, 1, 2, True, 0x33)
    with gs:
        held = Held(probe_binary, machine, 2, 1, share.refs[0], "rw")
        assert held.first == "ok 33"
        share.unshare()  # the guest lets go; the back-end still maps the page
        with pytest.raises(OSError) as exc:
            gs.share_pages(2, 2)
        assert exc.value.errno == errno.ENOMEM, "the mapped page is not free yet"
        assert held.release() == ["still", "33", "unmap", "0"]
        assert len(gs.share_pages(2, 2).refs) == 2, "the last unmap freed it"


def test_the_pins_of_a_dead_mapper_are_dropped(machine: xensim.Machine,
                                               probe_binary: Path) -> None:
    machine.create_domain(1, 64)
    machine.create_domain(2, 64)
    gs, share = share_one(machine, 1, 2, True, 0x44)
    with gs:
        held = Held(probe_binary, machine, 2, 1, share.refs[0], "rw")
        assert held.first == "ok 44"
        held.kill()  # gntdev's release would have unmapped it
        gs.end_access(share.refs[0])
