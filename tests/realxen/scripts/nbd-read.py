"""dom0's reader of a live VBD over its NBD export: prints the md5 of LENGTH bytes at
OFFSET. Runs on dom0's Python beside nbd_client.py (tests/support/nbd.py, a client
written from the NBD protocol document, not from our server's codec).

    python3 nbd-read.py SOCKET OFFSET LENGTH
"""

import hashlib
import sys

from nbd_client import NbdClient  # type: ignore[import-not-found]  # beside it in dom0

CHUNK = 1 << 20  # below every server's maximum payload


def main() -> int:
    sock, offset, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    digest = hashlib.md5()
    with NbdClient(sock) as nbd:
        for at in range(offset, offset + length, CHUNK):
            digest.update(nbd.read(at, min(CHUNK, offset + length - at)))
    print(digest.hexdigest())
    return 0


if __name__ == "__main__":
    sys.exit(main())
