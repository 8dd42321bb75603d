"""A guest process rewriting its own shared tables must not reach into dom0 processes.

Every process of a simulated domain maps that domain's state file read-write (it
writes its grant table and ports there, as a guest writes its grant table in real
Xen), so values in it are guest data: a dom0 process may only use them after a bound
check against what it knows privately, never as an address, a size or a file name.
"""

from __future__ import annotations

from pathlib import Path

from blktap3.sim import xensim
from blktap3.sim.xenlib import GrantShare

from .conftest import Probe

GNTST_OKAY = 0
GNTST_BAD_PAGE = -9
GUEST = 1
GUEST_PAGES = 64


def test_a_grant_frame_past_the_memory_is_refused_even_if_nr_pages_says_otherwise(
        machine: xensim.Machine, probe: Probe) -> None:
    machine.create_domain(GUEST, GUEST_PAGES)
    with GrantShare(machine.run_dir, GUEST) as gs:
        share = gs.share_pages(0, 1, writable=True)
        ref = share.refs[0]
        # The guest claims 1M pages and points its grant far past its 64-page file:
        # before the fix, dom0 copied from there (SIGBUS past the file, or memory of
        # another mapping).
        assert probe(GUEST, "poke", GUEST, "nr_pages", 1 << 20) == "ok"
        assert probe(GUEST, "poke", GUEST, "frame", ref, 100_000) == "ok"
        assert probe(0, "copy-from", GUEST, ref) == f"status {GNTST_BAD_PAGE} c3"
        assert probe(0, "copy-to", GUEST, ref) == f"status {GNTST_BAD_PAGE} c3"
        assert probe(0, "map", GUEST, ref, "ro") == "err 22"
        # One page past the real end is refused as well.
        assert probe(GUEST, "poke", GUEST, "frame", ref, GUEST_PAGES) == "ok"
        assert probe(0, "copy-from", GUEST, ref) == f"status {GNTST_BAD_PAGE} c3"


def test_dom0_maps_the_guest_memory_file_it_created_not_the_one_the_guest_names(
        machine: xensim.Machine, probe: Probe, tmp_path: Path) -> None:
    machine.create_domain(GUEST, GUEST_PAGES)
    secret = tmp_path / "dom0-secret"
    secret.write_bytes(b"\x5e" * (GUEST_PAGES * 4096))
    with GrantShare(machine.run_dir, GUEST) as gs:
        share = gs.share_pages(0, 1, writable=True)
        assert share.buffer is not None
        share.buffer[0] = 0x42
        assert probe(GUEST, "poke", GUEST, "mem_path", secret) == "ok"
        # Before the fix dom0 mapped the named file: it read the secret (5e) and a
        # copy-to would have written into it.
        assert probe(0, "copy-from", GUEST, share.refs[0]) == f"status {GNTST_OKAY} 42"
        assert probe(0, "copy-to", GUEST, share.refs[0]) == f"status {GNTST_OKAY} c3"
    assert secret.read_bytes() == b"\x5e" * (GUEST_PAGES * 4096)


def test_destroying_a_domain_unlinks_its_own_memory_file_only(
        machine: xensim.Machine, probe: Probe, tmp_path: Path) -> None:
    machine.create_domain(GUEST, GUEST_PAGES)
    victim = tmp_path / "dom0-file"
    victim.write_bytes(b"keep")
    assert probe(GUEST, "poke", GUEST, "mem_path", victim) == "ok"
    machine.destroy_domain(GUEST)
    assert victim.read_bytes() == b"keep"
