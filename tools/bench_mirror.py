"""The ``--mirror`` rows of ``blktap3-bench``: what mirroring (``-2 SECONDARY``) costs a VBD.

The same primary file is served by three tapdisks of the rig: unmirrored (the ``disk``
VBD of every other row), mirrored to a second file (``aio:``) and mirrored to an NBD
target (Debian's ``qemu-nbd`` serving a third file: a peer none of us wrote, the target
of a storage migration). Each write workload then runs in rounds, mirrored then
unmirrored, mirrored then unmirrored (as ours and fio alternate, ``bench_rounds``); a
row holds the mirrored run's medians and, as its ``ratio``, the median of the rounds'
mirrored/unmirrored IOPS, with their spread. 1.0 means mirroring costs nothing; a file
secondary on the same disk as the primary cannot beat about 0.5 for a disk-bound load,
since every byte is written twice.

Each secondary starts as a copy of the primary (what a migration's bulk copy leaves):
holes would cost an allocation on the first write and measure the file system instead of
the mirror, and right after a mirrored run the secondary equals the primary again.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import bench_ring

# (row label, VBD of the rig)
KINDS = (("aio", "mirror-file"), ("nbd", "mirror-nbd"))


def unavailable() -> str | None:
    """Why the NBD secondary cannot run here, or None."""
    if shutil.which("qemu-nbd") is None:
        return "--mirror needs qemu-nbd for its NBD secondary (Debian: qemu-utils)"
    return None


@contextlib.contextmanager
def _qemu_nbd(image: Path, sock: Path) -> Iterator[None]:
    """qemu-nbd serving ``image`` (writable, one client at a time, no cache flags: as a
    migration target would be started) until the block ends."""
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-k", str(sock), str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():  # qemu-nbd has no readiness signal but its socket
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.stderr and proc.poll() is not None else b""
                raise RuntimeError(f"qemu-nbd did not start: {err!r}")
            time.sleep(0.02)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def secondaries(rig: bench_ring.RingRig, tmp: Path) -> Iterator[tuple[Path, Path]]:
    """Add the two mirrored VBDs of the primary to ``rig`` while the block runs; it gets
    their secondary files (aio:, NBD target)."""
    file_sec, nbd_sec = tmp / "mirror.img", tmp / "target.img"
    shutil.copyfile(rig.disk, file_sec)
    shutil.copyfile(rig.disk, nbd_sec)
    sock = tmp / "target.sock"
    with _qemu_nbd(nbd_sec, sock):
        rig.add_vbd("mirror-file", f"aio:{rig.disk}", secondary=f"aio:{file_sec}")
        rig.add_vbd("mirror-nbd", f"aio:{rig.disk}", secondary=f"nbd:{sock}")
        try:
            yield file_sec, nbd_sec
        finally:
            # The NBD client goes before its server: a tapdisk whose target vanished
            # first would only count a failed mirror, but the order is the clean one.
            for _, name in KINDS:
                vbd = rig.vbds.pop(name, None)
                if vbd is not None:
                    vbd.close()


def rows(rig: bench_ring.RingRig, workload: str, shape: tuple[str, int, int, float],
         rounds: int, persistent: bool) -> Iterator[dict[str, Any]]:
    """One row per secondary kind for a write workload of ``shape`` (rw, bs, qd, runtime)."""
    for label, name in KINDS:
        pairs = [(_mirrored(rig, shape, name, persistent),
                  rig.run(*shape, persistent=persistent)) for _ in range(rounds)]
        mirrored = [m for m, _ in pairs]
        ratios = [m["ours_iops"] / p["ours_iops"] for m, p in pairs if p["ours_iops"]]
        row: dict[str, Any] = {"workload": f"  -2 {label}: {workload}", "rounds": rounds}
        for key in mirrored[0]:
            values = [m[key] for m in mirrored if isinstance(m[key], int | float)]
            row[key] = statistics.median(values) if values else None
        row["plain_iops"] = statistics.median(p["ours_iops"] for _, p in pairs)
        row["ratios"] = ratios
        row["ratio"] = statistics.median(ratios) if ratios else None
        row["ratio_min"] = min(ratios) if ratios else None
        row["ratio_max"] = max(ratios) if ratios else None
        yield row


def _mirrored(rig: bench_ring.RingRig, shape: tuple[str, int, int, float], name: str,
              persistent: bool) -> dict[str, Any]:
    """One mirrored run; a mirror that failed meanwhile (then writes go to the primary
    alone) would make the figure a lie: RuntimeError."""
    figures = rig.run(*shape, image=name, persistent=persistent)
    stats = rig.last["tapdisk_stats"]
    if not stats["mirror"]["active"] or stats["nbd_mirror_failed"]:
        raise RuntimeError(f"the {name} secondary failed during the run: {stats['mirror']}")
    return figures
