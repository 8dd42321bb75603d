"""The export's image descriptor on real files: holes, punch, zero, O_DIRECT I/O."""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blktap3.tapdisk.nbd import backend as be
from blktap3.tapdisk.nbd.protocol import State

MiB = 1 << 20
SIZE = 8 * MiB
DATA, HOLE = State.DATA, State.HOLE | State.ZERO


def aligned(data: bytes) -> memoryview:
    buf = mmap.mmap(-1, max(len(data), 4096))
    buf[:len(data)] = data
    return memoryview(buf)[:len(data)]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """8 MiB, sparse, with data in [0, 64K) and [3M, 3M+8K)."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(b"\x11" * 65536)
        f.seek(3 * MiB)
        f.write(b"\x22" * 8192)
    return path


def can_seek_holes(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < os.fstat(fd).st_size
    finally:
        os.close(fd)


@pytest.fixture(params=[True, False], ids=["o_direct", "buffered"])
def backend(request: pytest.FixtureRequest, image: Path) -> Iterator[be.FileBackend]:
    if not can_seek_holes(image):
        pytest.skip("this file system reports no holes")
    try:
        b = be.FileBackend(str(image), size=SIZE, readonly=False, o_direct=request.param,
                           can_punch=True)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            pytest.skip("no O_DIRECT on this file system")
        raise
    yield b
    b.close()


def test_extents_follow_the_files_holes(backend: be.FileBackend) -> None:
    assert backend.extents(0, SIZE, 100) == [
        (65536, DATA), (3 * MiB - 65536, HOLE), (8192, DATA), (5 * MiB - 8192, HOLE)]


def test_extents_are_clipped_to_the_query_and_the_limit(backend: be.FileBackend) -> None:
    assert backend.extents(4096, 8192, 100) == [(8192, DATA)]
    assert backend.extents(0, SIZE, 1) == [(65536, DATA)]
    assert backend.extents(MiB, MiB, 100) == [(MiB, HOLE)]


def test_an_unaligned_query_keeps_block_boundaries(backend: be.FileBackend) -> None:
    extents = backend.extents(65536 - 100, 1000, 100)
    assert extents == [(100, DATA), (900, HOLE)]


def test_write_then_read_on_aligned_buffers(backend: be.FileBackend, image: Path) -> None:
    data = os.urandom(8192)
    backend.write(aligned(data), MiB, fua=True)
    buf = aligned(bytes(8192))
    backend.read_into(buf, MiB)
    assert bytes(buf) == data
    with open(image, "rb") as f:
        f.seek(MiB)
        assert f.read(8192) == data


def test_reads_past_the_end_of_a_shorter_file_are_zeroes(tmp_path: Path) -> None:
    path = tmp_path / "short.img"
    path.write_bytes(b"\x33" * 4096)
    b = be.FileBackend(str(path), size=8192, readonly=True, o_direct=False, can_punch=False)
    buf = aligned(b"\xff" * 8192)
    b.read_into(buf, 0)
    assert bytes(buf) == b"\x33" * 4096 + bytes(4096)
    b.close()


def test_trim_punches_whole_blocks_only(backend: be.FileBackend, image: Path) -> None:
    backend.trim(100, 65536 - 200)  # the first and last partial sectors are kept
    content = image.read_bytes()
    assert content[:512] == b"\x11" * 512
    assert content[512:65024] == bytes(65024 - 512)
    assert content[65024:65536] == b"\x11" * 512


def test_write_zeroes_may_punch_a_hole(backend: be.FileBackend, image: Path) -> None:
    before = os.stat(image).st_blocks
    backend.zero(0, 65536, may_punch=True)
    assert image.read_bytes()[:65536] == bytes(65536)
    assert os.stat(image).st_blocks < before


def test_write_zeroes_with_no_hole_allocates(backend: be.FileBackend, image: Path) -> None:
    before = os.stat(image).st_blocks
    backend.zero(MiB, MiB, may_punch=False)
    assert image.read_bytes()[MiB:2 * MiB] == bytes(MiB)
    assert os.stat(image).st_blocks >= before + MiB // 512


def test_zeroes_are_written_out_where_fallocate_cannot(
    backend: be.FileBackend, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "no")

    monkeypatch.setattr(be, "fallocate", refuse)
    backend.zero(0, 2 * MiB, may_punch=True)
    assert image.read_bytes()[:65536] == bytes(65536)
    with pytest.raises(OSError) as err:
        backend.zero(0, be.ZERO_WRITE_LIMIT + 512, may_punch=True)
    assert err.value.errno == errno.EOVERFLOW


def test_only_files_and_block_devices_are_images(tmp_path: Path) -> None:
    with pytest.raises(OSError) as err:
        be.FileBackend(str(tmp_path), size=0, readonly=True, o_direct=False, can_punch=False)
    assert err.value.errno in (errno.EINVAL, errno.EISDIR)


def test_the_null_image_reads_zeroes_and_is_all_hole() -> None:
    b = be.NullBackend(SIZE)
    buf = aligned(b"\xff" * 4096)
    b.read_into(buf, 0)
    assert bytes(buf) == bytes(4096)
    assert b.extents(0, SIZE, 10) == [(SIZE, HOLE)]


@settings(max_examples=60)
@given(blocks=st.sets(st.integers(0, 255), max_size=40),
       start=st.integers(0, MiB - 1), length=st.integers(1, MiB))
def test_extents_cover_the_query_and_never_call_data_a_hole(
    tmp_path_factory: pytest.TempPathFactory, blocks: set[int], start: int, length: int,
) -> None:
    path = tmp_path_factory.mktemp("sparse") / "disk.img"
    with open(path, "wb") as f:
        f.truncate(MiB)
        for block in blocks:
            f.seek(block * 4096)
            f.write(b"\x44" * 4096)
    length = min(length, MiB - start)
    b = be.FileBackend(str(path), size=MiB, readonly=True, o_direct=False, can_punch=False)
    try:
        extents = b.extents(start, length, 10_000)
    finally:
        b.close()
    assert sum(n for n, _ in extents) == length
    content = path.read_bytes()
    pos = start
    for n, state in extents:
        assert n > 0
        if state == HOLE:
            assert content[pos:pos + n] == bytes(n)
        pos += n
