"""The seed corpus of the VHD fuzz targets (``corpus/vhd/``): small real images, ours and
qemu-img's (and blktap's vhd-util's where BLKTAP_BUILD names a build), written, chained,
then encoded as ``fuzz_vhd.c`` reads them. ``python -m tests.fuzz.vhd_seeds`` writes the
corpus anew; the encoding is shared with the atheris target (``fuzz_parsers.py``).

Input: [flags][nops][nops x 8-byte op][leaf image][parent image if flags & 1];
image: [u32le size][u8 extents]{[u32le offset][u16le length][bytes]} over zeros, so an
image of 2 MiB blocks with a few sectors written stays a few KiB.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from blktap3.datapath import Image
from blktap3.datapath import vhdformat as vhd
from tests.support.tools import blktap_vhd_util

CORPUS = Path(__file__).resolve().parent / "corpus" / "vhd"
MAX_EXTENT = 0xFFFF
KiB, MiB = 1 << 10, 1 << 20


def encode_image(raw: bytes) -> bytes:
    """The file as extents of its non-zero sectors (at most 255 extents)."""
    runs: list[tuple[int, int]] = []
    for off in range(0, len(raw), 512):
        if any(raw[off : off + 512]):
            end = min(off + 512, len(raw))
            if runs and runs[-1][1] == off and off - runs[-1][0] < MAX_EXTENT - 512:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((off, end))
    if len(runs) > 255:
        raise ValueError(f"{len(runs)} extents: too many to encode")
    out = bytearray(struct.pack("<IB", len(raw), len(runs)))
    for start, end in runs:
        out += struct.pack("<IH", start, end - start) + raw[start:end]
    return bytes(out)


def decode_image(blob: memoryview | bytes) -> tuple[bytes | None, int]:
    """(the file, bytes used), as fuzz_vhd.c's make_file reads it; None if unusable."""
    if len(blob) < 5:
        return None, len(blob)
    size, n = struct.unpack_from("<IB", blob)
    if size < 512 or size > 64 * MiB:
        return None, len(blob)
    out = bytearray(size)
    at = 5
    for _ in range(n):
        if len(blob) - at < 6:
            break
        off, length = struct.unpack_from("<IH", blob, at)
        at += 6
        length = min(length, len(blob) - at)
        if off < size:
            chunk = bytes(blob[at : at + length])[: size - off]
            out[off : off + len(chunk)] = chunk
        at += length
    return bytes(out), at


def decode(data: bytes) -> list[bytes]:
    """The images of one input (leaf first), skipping the ops; [] when unusable."""
    if len(data) < 2:
        return []
    flags, nops = data[0], data[1] % 17
    at = 2 + nops * 8
    if len(data) < at:
        return []
    images = []
    for _ in range(2 if flags & 1 else 1):
        raw, used = decode_image(memoryview(data)[at:])
        if raw is None:
            return []
        images.append(raw)
        at += used
    return images


def op(kind: int, sector: int, nr: int, fill: int) -> bytes:
    """kind 0 write, 1 read, 2 discard; nr 1..64."""
    return struct.pack("<BIBBB", kind, sector, nr - 1, fill, 0)


def encode(images: list[bytes], ops: list[bytes]) -> bytes:
    return bytes([1 if len(images) == 2 else 0, len(ops)]) + b"".join(ops) + \
        b"".join(encode_image(raw) for raw in images)


def _run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def seeds(d: Path) -> dict[str, bytes]:
    """name -> input."""
    ops = [op(0, 8, 16, 0x11), op(1, 0, 64, 0), op(0, 4100, 4, 0x22), op(1, 4096, 8, 0),
           op(2, 8, 8, 0), op(1, 8, 16, 0), op(0, 1, 1, 0x33), op(1, 0, 2, 0)]
    out: dict[str, bytes] = {}

    def ours(name: str, size: int, **kw: int) -> Path:
        p = d / name
        vhd.create(p, size, **kw)   # type: ignore[arg-type]
        return p

    def write(p: Path, *spans: tuple[int, int]) -> None:
        img = Image.open("vhd", str(p))
        for off, n in spans:
            img.write(off // 512, bytes([0x40 + off % 97]) * n)
        img.close()

    fixed = ours("fixed.vhd", 64 * KiB, fixed=True)
    write(fixed, (0, 4096))
    out["ours-fixed"] = encode([fixed.read_bytes()], ops)
    dyn = ours("dyn.vhd", 4 * MiB)
    out["ours-dynamic-empty"] = encode([dyn.read_bytes()], ops)
    write(dyn, (0, 4096), (2 * MiB + 512, 1024))
    out["ours-dynamic"] = encode([dyn.read_bytes()], ops)
    small = ours("small.vhd", 256 * KiB, block_size=4096)
    write(small, (4096, 4096), (16 * KiB + 1024, 512))
    out["ours-dynamic-4k-blocks"] = encode([small.read_bytes()], ops)
    leaf = d / "leaf.vhd"
    vhd.create(leaf, 0, parent=small)
    write(leaf, (4096 + 512, 512), (32 * KiB, 2048))
    out["ours-chain-4k-blocks"] = encode([leaf.read_bytes(), small.read_bytes()], ops)
    leaf2 = d / "leaf2.vhd"
    vhd.create(leaf2, 0, parent=dyn)
    write(leaf2, (1024, 512))
    out["ours-chain"] = encode([leaf2.read_bytes(), dyn.read_bytes()], ops)

    if shutil.which("qemu-img"):
        for sub in ("dynamic", "fixed"):
            q = d / f"qemu-{sub}.vhd"
            _run("qemu-img", "create", "-q", "-f", "vpc", "-o", f"subformat={sub}", q, "4M")
            _run("qemu-io", "-f", "vpc", "-c", "write -P 0x5a 512 3k",
                 "-c", "write -P 0xa5 2M 512", q)
            out[f"qemu-{sub}"] = encode([q.read_bytes()], ops)
        q = d / "qemu-empty.vhd"
        _run("qemu-img", "create", "-q", "-f", "vpc", q, "8M")
        out["qemu-dynamic-empty"] = encode([q.read_bytes()], ops)

    tool = blktap_vhd_util()
    if tool is not None:
        b = d / "blktap.vhd"
        _run(tool, "create", "-n", b, "-s", "4")
        bl = d / "blktap-leaf.vhd"
        _run(tool, "snapshot", "-n", bl, "-p", b)
        out["blktap-dynamic"] = encode([b.read_bytes()], ops)
        out["blktap-chain"] = encode([bl.read_bytes(), b.read_bytes()], ops)
    return out


def main() -> int:
    CORPUS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        for name, blob in seeds(Path(d)).items():
            digest = hashlib.sha1(blob).hexdigest()[:12]
            (CORPUS / f"seed-{name}-{digest}").write_bytes(blob)
            print(f"{name}: {len(blob)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
