"""Random walks: front-end behaviour no scenario wrote down, generated as scenarios.

A walk is a `Scenario` like the hand-written ones (so the runner, the table, the JSON and
the coverage treat it the same), built from a seed: the disk attached, then random
front-end moves (states in any order, the transport written or not, the ring let go,
garbage in the state node) and, at the end, the toolstack's detach. Walks make no claim
about the handshake's outcome; they check what must hold whatever a guest does:

- the back-end never publishes a state a front-end cannot expect (0, 3, 7, 8 or garbage:
  the walk's guest is NetBSD, which panics on them),
- the back-end daemon is alive after every move,
- the detach leaves no directory and no tapdisk.

`blktap3-conformance --random N [--seed S]` runs N walks; a failing walk is printed with
its seed and its steps, so it can be replayed and written down as a scenario.
"""

from __future__ import annotations

import random

from .scenario import Scenario, Step

PERSONALITY = "netbsd"  # the strictest guest: any unexpected back-end state fails the walk
MOVES = ("state", "state", "transport", "release", "garbage", "settle")
STATES = (1, 3, 4, 5, 6)


def walk(seed: int, length: int = 8) -> Scenario:
    rng = random.Random(seed)
    steps = [Step("attach", {}, {"alive": True})]
    ring = False
    for _ in range(length):
        move = rng.choice(MOVES)
        if move == "state":
            steps.append(Step("set_state", {"state": rng.choice(STATES)}, {"alive": True}))
        elif move == "transport":
            if not ring:
                steps.append(Step("open_ring", {}, {}))
                ring = True
            steps.append(Step("write_transport", {"tx": rng.random() < 0.5}, {"alive": True}))
        elif move == "release" and ring:
            steps.append(Step("release_ring", {}, {}))
            ring = False
        elif move == "garbage":
            value = rng.choice(["7", "8", "0", "", "x", "-1", "99999999999"])
            steps.append(Step("write_key", {"dir": "frontend", "key": "state", "value": value},
                              {"alive": True}))
        else:
            steps.append(Step("wait_backend", {"states": [1, 2, 4, 5, 6]}, {"alive": True}))
    steps.append(Step("detach", {}, {"backend_dir": False, "tapdisks": 0, "alive": True}))
    return Scenario(name=f"walk-{seed}", personality=PERSONALITY,
                    doc=f"random front-end walk, seed {seed}", kind="walk", steps=tuple(steps))


def walks(count: int, seed: int) -> list[Scenario]:
    return [walk(seed + i) for i in range(count)]
