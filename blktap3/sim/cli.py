"""blktap3-sim: placeholder until the simulated host lands (issue 2)."""

import sys


def main() -> int:
    print("blktap3-sim: not built yet", file=sys.stderr)
    return 1
