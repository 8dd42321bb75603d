"""Model walks: hypothesis draws front-end, toolstack and tapdisk moves in any order and
plays them on the two machines wired in memory (`blktap3.sim.memory.VbdPair`: the
back-end's observer and machine as tapback runs them, the front-end machine as the
simulated blkfronts run it). Thousands of sequences a minute, where a host scenario takes
a second or two; what a walk finds is then written down as a scenario.

Each walk checks what must hold whatever happens: no machine raises (a state without a
row for what it was fed is our bug), and the back-end never publishes a state a
front-end cannot expect (0, 3, 7, 8: NetBSD panics). A failing walk is shrunk by
hypothesis to its shortest sequence and reported. Every row each machine took is
recorded: the coverage of both machines, and (`baseline`: the JSON of a scenario run)
the back-end rows the walks took that no scenario did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from blktap3.fsm.events import DeviceClose, DeviceReconnect
from blktap3.sim.memory import VbdPair

from .coverage import Coverage, coverage, trace

ALLOWED_BACKEND_STATES = {1, 2, 4, 5, 6}
FRONTEND_VALUES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "", "x", "99999999999")
Move = tuple[str, Any]

MOVES = st.one_of(
    st.tuples(st.just("hotplug"), st.none()),
    st.tuples(st.just("device_close"), st.none()),
    st.tuples(st.just("device_reconnect"), st.none()),
    st.tuples(st.just("frontend_writes_state"), st.sampled_from(FRONTEND_VALUES)),
    st.tuples(st.just("remove_frontend"), st.none()),
    st.tuples(st.just("offline"), st.none()),
    st.tuples(st.just("kill_tapdisk"), st.none()),
    st.tuples(st.just("resize"), st.integers(1, 1 << 20)),
    st.tuples(st.just("remove_backend"), st.none()),
)


@dataclass
class WalkReport:
    walks: int = 0
    lines: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"backend_vbd": [], "frontend_vbd": []})
    failure: str | None = None  # the shortest failing sequence and what went wrong

    def coverage(self) -> dict[str, Coverage]:
        return {m: coverage(lines, m) for m, lines in self.lines.items()}


def play(moves: list[Move], report: WalkReport) -> None:
    """One walk on a fresh pair; AssertionError (with the sequence) when a rule broke."""
    pair = VbdPair()
    trace(pair.backend, report.lines["backend_vbd"])
    trace(pair.frontend, report.lines["frontend_vbd"])
    fe_state = f"{pair.fe_path}/state"
    done: list[str] = ["create directories"]
    try:
        pair.create_backend_dir()
        pair.create_frontend_dir()
        pair.store.pump()
        for move, arg in moves:
            done.append(f"{move}({arg!r})" if arg is not None else move)
            match move:
                case "hotplug":
                    pair.hotplug()
                case "device_close":
                    pair.guest(DeviceClose())
                case "device_reconnect":
                    if str(pair.frontend.state) == "closed":  # blkfront starts over from there
                        pair.guest(DeviceReconnect())
                case "frontend_writes_state":
                    pair.store.write("guest", fe_state, arg)
                case "remove_frontend":
                    pair.remove_frontend()
                case "offline":
                    pair.set_offline()
                case "kill_tapdisk":
                    pair.kill_tapdisk()
                case "resize":
                    pair.resize(arg)
                case "remove_backend":
                    pair.store.rm("toolstack", pair.be_path)
            pair.store.pump()
    except Exception as e:
        raise AssertionError(f"{' -> '.join(done)}: {type(e).__name__}: {e}") from e
    bad = [s for s in pair.backend_states() if s not in ALLOWED_BACKEND_STATES]
    assert not bad, f"{' -> '.join(done)}: back-end published state {bad[0]}"


def model_walks(count: int, first_seed: int, length: int = 12) -> WalkReport:
    """`count` walks of up to `length` moves from `first_seed`; the shortest failing one
    (hypothesis shrinks it) in `failure`."""
    report = WalkReport()

    @seed(first_seed)
    @settings(max_examples=count, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(MOVES, max_size=length))
    def walk(moves: list[Move]) -> None:
        report.walks += 1
        play(moves, report)

    try:
        walk()
    except AssertionError as e:
        report.failure = str(e)
    return report


def unreached_by_scenarios(cov: Coverage, baseline: dict[str, Any]) -> list[str]:
    """Rows the walks took that the baseline run's scenarios missed."""
    missed = set(baseline.get("coverage_detail", {}).get(cov.machine, {}).get("missed", []))
    return [d for d in cov.taken() if d in missed]
