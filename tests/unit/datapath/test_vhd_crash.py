"""Crash tests of the VHD driver's allocation order: a writer (a child process doing
allocating writes through the C driver, an fdatasync after each batch) is SIGKILLed at
a random point after a random flush; the image must then open (ours) and pass blktap's
`vhd-util check` (given BLKTAP_BUILD), and every write flushed before the kill must be
there. SIGKILL keeps what reached the page cache, so this pins the order of the
metadata writes (footer, bitmap and data, sync, BAT), not the device's cache."""

from __future__ import annotations

import multiprocessing
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from blktap3.datapath import Image
from blktap3.datapath import vhdformat as vhd
from tests.support.tools import blktap_vhd_util, run_tool

MiB = 1 << 20
SIZE = 16 * MiB
SECTORS = SIZE // 512
BATCHES = 12
KILLS = 50
VHD_UTIL = blktap_vhd_util()
WAIT = 60.0  # seconds for the writer's next flush: past it the test fails, not hangs

# Writers fork from a fresh single-threaded server, not from pytest: a fork of a process
# whose other thread holds a lock (ASan's allocator, under sanitize.sh) hung the child.
FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload([__name__])


def batches(seed: int) -> list[list[tuple[int, bytes]]]:
    """The writes of each batch: 1..64 sectors anywhere, a byte pattern each."""
    rng = random.Random(seed)
    out = []
    for b in range(BATCHES):
        batch = []
        for w in range(6):
            count = rng.randint(1, 64)
            sector = rng.randrange(0, SECTORS - count)
            batch.append((sector, bytes([(b * 6 + w) % 251 + 1]) * (count * 512)))
        out.append(batch)
    return out


def writer(path: Path, seed: int, done: Connection) -> None:
    """The child: each batch, then fdatasync, then say so on the pipe."""
    img = Image.open("vhd", str(path))
    sync = os.open(path, os.O_RDONLY)
    for i, batch in enumerate(batches(seed)):
        for sector, data in batch:
            img.write(sector, data)
        os.fdatasync(sync)
        done.send(i)


def crash_once(tmp_path: Path, seed: int, differencing: bool) -> None:
    rng = random.Random(seed)
    base = tmp_path / f"base{seed}.vhd"
    vhd.create(base, SIZE)
    path = base
    if differencing:
        path = tmp_path / f"leaf{seed}.vhd"
        vhd.create(path, 0, parent=base)
    plan = batches(seed)
    kill_after = rng.randrange(0, BATCHES - 1)
    r, w = FORKSERVER.Pipe(duplex=False)
    child = FORKSERVER.Process(target=writer, args=(path, seed, w), daemon=True)
    child.start()
    w.close()
    try:
        flushed = -1
        while flushed < kill_after:
            assert r.poll(WAIT), "the writer neither flushed nor died"
            try:
                flushed = r.recv()
            except EOFError:
                raise AssertionError("the writer died before its flush") from None
        child.kill()  # SIGKILL: somewhere inside the next batch, or just after
    finally:
        child.kill()
        child.join()
        r.close()
    # Valid for us, and for blktap.
    chain = vhd.open_chain(path)
    if VHD_UTIL is not None:
        out = run_tool(VHD_UTIL, "check", "-n", path, check=False)
        assert out.returncode == 0, out.stdout
    # Every flushed write is there; a sector written again later may hold the later one.
    allowed: dict[int, set[bytes]] = {}
    for i, batch in enumerate(plan):
        for sector, data in batch:
            for k in range(len(data) // 512):
                chunk = data[k * 512 : (k + 1) * 512]
                allowed[sector + k] = ({chunk} if i <= flushed else
                                       allowed.get(sector + k, {bytes(512)}) | {chunk})
    content = vhd.read_chain(chain, 0, SECTORS)
    for sector, ok in allowed.items():
        assert content[sector * 512 : (sector + 1) * 512] in ok, (seed, sector)


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """tmpfs: the syncs cost nothing there (a SIGKILL keeps the page cache anyway)."""
    d = Path(tempfile.mkdtemp(prefix="blktap3-vhd-crash-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("differencing", [False, True])
def test_killed_writers_leave_valid_images_with_every_flushed_write(
        shm_dir: Path, differencing: bool) -> None:
    for seed in range(KILLS // 2):
        crash_once(shm_dir, seed + 1000 * differencing, differencing)
        for f in shm_dir.iterdir():
            f.unlink()
