"""Run scenarios against a back-end on a simulated host; a verdict for every step.

Each scenario gets a host of its own (Debian's xenstored under xensim, the back-end under
test started on it), so that a scenario that kills a tapdisk or restarts the back-end
leaves nothing to the next one. The scenario's guest domain is created as libxl does,
its disk attached as the vbd3 toolstack does (nodes, then the hotplug step), then the
steps run in order. After each step its expectations are waited for (up to the step
timeout: a back-end answers asynchronously) and compared; the difference is the
verdict's text. After a failed step the rest of the scenario is skipped (what follows
would only report the same fault), and the host is taken down whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from blktap3.ctl import ops
from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.ctl.protocol import ResumeFlags
from blktap3.sim.host import Host
from blktap3.sim.hotplug import Attached, hotplug_add, hotplug_remove
from blktap3.sim.toolstack import BLOCK_TAP_SCRIPT, Image
from blktap3.sim.xenstored import Kind
from blktap3.vbd3.blocktap import BlockTap
from blktap3.vbd3.disk import write_vbd_nodes
from blktap3.xenbus import (
    BackendKey,
    Transaction,
    VbdPaths,
    WatchStream,
    XenbusState,
    XenStoreError,
)

from .backends import Backend
from .coverage import frontend_lines
from .denying import DenyingXenStore
from .guest import GuestFault, ScriptedGuest
from .lying import LyingTapdisk
from .scenario import STATUSES, Personality, Scenario, Step

DEVID = 51712  # xvda
DOMID = 7
MiB = 1 << 20
STATUS_NAMES = {v: k for k, v in STATUSES.items()}
# What the action returned: never changes.
IMMEDIATE = {"status", "verified", "refused", "ring_offered"}


@dataclass(frozen=True)
class StepVerdict:
    index: str  # "3" or "3.2" (a routine's step)
    label: str
    verdict: str  # pass | FAIL | xfail | XPASS | skip
    expected: str = ""
    observed: str = ""
    diff: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.index, "label": self.label, "verdict": self.verdict,
                "expected": self.expected, "observed": self.observed, "diff": list(self.diff)}


@dataclass
class ScenarioResult:
    scenario: Scenario
    backend: str
    xenstored: str
    steps: list[StepVerdict] = field(default_factory=list)
    seen_states: list[str | None] = field(default_factory=list)
    log_path: Path | None = None
    coverage_lines: list[dict[str, Any]] = field(default_factory=list)
    # the front-end machine's rows the back-end states each guest saw make it take
    frontend_lines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        verdicts = {s.verdict for s in self.steps}
        if "FAIL" in verdicts:
            return "FAIL"
        if self.scenario.xfail is not None:
            return "xfail" if "xfail" in verdicts else "XPASS"
        return "XPASS" if "XPASS" in verdicts else ("xfail" if "xfail" in verdicts else "pass")

    @property
    def ok(self) -> bool:
        return self.verdict in ("pass", "xfail")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.scenario.name, "personality": self.scenario.personality,
                "kind": self.scenario.kind, "backend": self.backend,
                "xenstored": self.xenstored, "verdict": self.verdict,
                "xfail": self.scenario.xfail, "backend_states_seen": self.seen_states,
                "steps": [s.as_dict() for s in self.steps]}


class StepFailed(Exception):
    """The step's action itself failed (the guest could not do it): its observed text."""


class _Run:
    """One scenario on one host."""

    def __init__(self, scenario: Scenario, personalities: Mapping[str, Personality],
                 backend: Backend, host: Host, timeout: float) -> None:
        self.scenario = scenario
        self.personalities = personalities
        self.backend = backend
        self.host = host
        self.timeout = timeout
        self.domid = DOMID
        self.paths: VbdPaths | None = None
        self.attached: Attached | None = None
        self.image: Path | None = None
        self.mode = "w"
        self.guests: dict[str, ScriptedGuest] = {}
        self.observed: dict[str, Any] = {}  # what the last action produced
        self.log_since = 0  # the back-end's log offset when the last action began
        self.liar: LyingTapdisk | None = None
        self.denier: DenyingXenStore | None = None

    # -- the guest of a personality (OVMF hands the VBD to the OS's blkfront) --------------
    def guest(self, personality: str | None = None) -> ScriptedGuest:
        name = personality or self.scenario.personality
        if self.paths is None:
            raise StepFailed("no disk attached yet")
        if name not in self.guests:
            owner = next(iter(self.guests.values()), None)
            g = ScriptedGuest(str(self.host.run_dir), self.domid, self.paths,
                              self.personalities[name], self.host.xs, self.timeout,
                              xs=owner.xs if owner is not None else None)
            self.guests[name] = g
        return self.guests[name]

    # -- actions ----------------------------------------------------------------------------
    def act(self, step: Step, personality: str | None) -> None:
        p = step.params
        self.observed = {}
        self.log_since = self.backend.log_offset(self.host)
        if step.do == "attach":
            self.attach(p)
            return
        g = self.guest(personality)
        match step.do:
            case "wait_backend":
                states = [int(s) for s in p["states"]]
                reached = g.wait_backend(states)
                if reached not in states:
                    raise StepFailed(f"back-end state {reached} (wanted {states}; "
                                     f"seen {_seen(g)}; error {g.backend('error')!r})")
            case "open_ring":
                self.observed["ring_offered"] = g.open_ring(p.get("order"), p.get("queues"))
            case "write_transport":
                keys = g.transport(list(p.get("omit", [])),
                                   {str(k): str(v) for k, v in p.get("override", {}).items()})
                self._xs_write(lambda: g.write_keys(keys, bool(p.get("tx", True)),
                                                    p.get("state")))
            case "set_state":
                self._xs_write(lambda: g.set_state(int(p["state"]), bool(p.get("tx", False))))
            case "read_backend":
                g.read_backend([str(k) for k in p["keys"]],
                               [str(k) for k in p.get("optional", [])])
            case "io":
                status, verified = g.io(str(p.get("op", "write")), int(p.get("sector", 0)),
                                        int(p.get("count", 8)))
                self.observed.update(status=status, verified=verified)
            case "raw_request":
                self.observed["status"] = g.raw_request(dict(p))
            case "overflow":
                g.overflow()
            case "release_ring":
                g.release_ring()
            case "write_key":
                path = self._dir_key(g, str(p.get("dir", "backend")), str(p["key"]))
                self._xs_write(lambda: g.xs.write(path, str(p["value"])))
            case "remove_key":
                path = self._dir_key(g, str(p.get("dir", "frontend")), str(p["key"]))
                self._xs_write(lambda: g.xs.rm(path))
            case "hotplug":
                self.hotplug()
            case "toolstack_write":
                assert self.paths is not None
                with self.host.xs() as xs:
                    xs.write(self.paths.backend_key(str(p["key"])), str(p["value"]))
            case "resize":
                self.resize(int(p["size_mib"]))
            case "kill_tapdisk":
                assert self.attached is not None
                os.kill(self.attached.pid, signal.SIGKILL)
            case "restart_backend":
                self.backend.restart(self.host)
            case "stop_backend":
                self.backend.stop(self.host)
            case "start_backend":
                self.backend.start(self.host)
                self.backend.wait_settled(self.host)
            case "tapdisk_disconnect":
                self.tapdisk_disconnect()
            case "tapdisk_lies":
                assert self.attached is not None and self.liar is None
                self.liar = LyingTapdisk(self.host.control_dir, self.attached.pid,
                                         int(p["sector_size"]))
                self.liar.start()
            case "tapdisk_honest":
                self.honest()
            case "deny_frontend_state":
                self.deny_frontend_state(g)
            case "destroy_domain":
                self.destroy_domain(g)
            case "detach":
                assert self.paths is not None
                if not self._backend_dir():
                    # libxl finds no back-end directory: nothing to wait for, and its
                    # hotplug remove step (tap-ctl destroy) is skipped too.
                    self.observed["detach_reached"] = None
                    return
                self.observed["detach_reached"] = self.detach()
            case _:
                raise StepFailed(f"no such action {step.do}")

    def attach(self, p: Mapping[str, Any]) -> None:
        """The domain, then its disk's nodes as the toolstack writes them, then (unless
        `hotplug = false`: libxl's order, which runs it once the back-end is at InitWait)
        the hotplug step."""
        self.image = self.host.run_dir / f"disk{self.domid}.img"
        with open(self.image, "wb") as f:
            f.truncate(int(p.get("size_mib", 16)) * MiB)
        self.mode = str(p.get("mode", "w"))
        image = Image.parse(f"aio:{self.image}")
        cdrom = bool(p.get("cdrom", False))
        script = BLOCK_TAP_SCRIPT if self.host.toolstack_kind == "libxl" else None
        with self.host.toolstack() as ts:
            ts.create_domain(self.domid, p.get("memory_pages"))
            if p.get("frontend_state", True):
                self.paths = ts.add_vbd(self.domid, DEVID, image, mode=self.mode, cdrom=cdrom,
                                        script=script)
            else:
                # The back-end directory appears before the front-end's state node (a
                # toolstack writing in two steps): both written, the state taken back, in
                # one transaction, so that the back-end never sees it.
                paths = ts.vbd_paths(self.domid, DEVID)

                def body(tx: Transaction) -> None:
                    write_vbd_nodes(tx, paths, image, mode=self.mode, cdrom=cdrom,
                                    script=script)
                    tx.rm(paths.frontend_key("state"))

                ts.xs.transact(body)
                self.paths = paths
        if p.get("hotplug", True):
            self.hotplug()

    def hotplug(self) -> None:
        """The block-tap hotplug step: tapdisk created, physical-device-path, connected."""
        assert self.paths is not None and self.image is not None
        tap_ctl = self.backend.tap_ctl(self.host)
        if tap_ctl is not None:  # the back-end's own tap-ctl, driven as block-tap does
            with self.host.xs() as xs:
                blocktap = BlockTap(xs, tap_ctl, self.host.run_dir / "xen-hotplug" / "block")
                pid, minor = blocktap.add(self.paths)
                device = xs.read_optional(
                    self.paths.backend_key(BackendKey.PHYSICAL_DEVICE_PATH))
            self.attached = Attached(pid, minor, device or f"nbd{pid}.{minor}")
            if device is None:  # block-tap writes into the directory only if it exists
                raise StepFailed(f"the back-end directory {self.paths.backend} is gone "
                                 "after the hotplug step (removed by the back-end?)")
            return
        if self.host.toolstack_kind == "libxl":  # Xen's block-tap add, as libxl runs it
            with self.host.xs() as xs:
                pid, minor = self.host.block_tap(xs).add(self.paths)
                device = xs.read(self.paths.backend_key(BackendKey.PHYSICAL_DEVICE_PATH))
            self.attached = Attached(pid, minor, device)
            return
        self.attached = hotplug_add(self.host, self.paths, Image.parse(f"aio:{self.image}"),
                                    mode=self.mode)

    def detach(self) -> XenbusState | None:
        """libxl's detach (online=0, Closing, wait for Closed, hotplug remove, directories
        removed) while the guest's blkfronts answer the back-end's Closing with Closed, as
        every blkfront does (Linux: blkback_changed -> blkfront_closing)."""
        assert self.paths is not None
        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(self.host.detach_disk, self.domid, self.paths.devid,
                               self.timeout)
            for g in self.guests.values():
                with contextlib.suppress(XenStoreError, OSError):
                    own = g.xs.read_optional(g.paths.frontend_key("state"))
                    if own in ("3", "4") and g.wait_backend([5, 6]) == 5:
                        g.set_state(6, tx=True)
            reached = done.result()
        for g in self.guests.values():
            g.release_ring()
        return reached

    def tapdisk_disconnect(self) -> None:
        """A fault the harness injects: XENBLKIF_DISCONNECT sent to the tapdisk behind the
        back-end's back (a toolstack or operator taking the ring down), so that the
        back-end's own disconnect later meets ENODEV, and an adopting back-end finds no
        ring to adopt."""
        assert self.paths is not None and self.attached is not None
        client = TapdiskClient(self.attached.pid, root=self.host.control_dir)
        client.disconnect_xenblkif(self.attached.minor, domid=self.domid,
                                   devid=self.paths.devid)

    def resize(self, size_mib: int) -> None:
        """The image grew, then `tap-ctl resize` (pause, resume with RESIZE)."""
        assert self.image is not None and self.attached is not None
        with open(self.image, "r+b") as f:
            f.truncate(size_mib * MiB)
        client = TapdiskClient(self.attached.pid, root=self.host.control_dir)
        client.pause(self.attached.minor)
        client.resume(self.attached.minor, flags=int(ResumeFlags.RESIZE))

    def destroy_domain(self, g: ScriptedGuest) -> None:
        """The guest destroyed, I/O in flight: as libxl's forced destroy (the domain gone,
        both directories removed, then the hotplug remove step)."""
        if g.ring is not None:
            with contextlib.suppress(OSError):
                g.ring.send("run", qd=4, bs=4096, read_pct=50, random=True, span=2048,
                            duration=2.0, verify=False, stamp=1)
        assert self.paths is not None and self.attached is not None
        with self.host.toolstack() as ts:
            ts.destroy_domain(self.domid)
        hotplug_remove(self.host, self.paths, device=self.attached.device_path)
        for guest in self.guests.values():
            if guest.ring is not None:
                guest.ring.proc.kill()  # the domain is gone, and its blkfront with it
            guest.release_ring()

    def _dir_key(self, g: ScriptedGuest, which: str, key: str) -> str:
        return g.paths.backend_key(key) if which == "backend" else g.paths.frontend_key(key)

    def _xs_write(self, write: Callable[[], None]) -> None:
        try:
            write()
            self.observed["refused"] = False
        except XenStoreError as e:
            self.observed["refused"] = True
            self.observed["refused_by"] = str(e)

    # -- expectations -----------------------------------------------------------------------
    def compare(self, expect: Mapping[str, Any]) -> tuple[list[str], str]:
        """The differences between `expect` and what is observed now; the observed text."""
        diffs: list[str] = []
        seen: list[str] = []
        g = next(iter(self.guests.values()), None)

        def backend(key: str) -> str | None:
            if g is not None:
                return g.backend(key)
            if self.paths is None:
                return None
            with self.host.xs() as xs:
                return xs.read_optional(self.paths.backend_key(key))

        def check(name: str, want: Any, got: Any) -> None:
            seen.append(f"{name}={got!r}")
            if want != got:
                diffs.append(f"{name}: expected {want!r}, observed {got!r}")

        if "backend_state" in expect:
            raw = backend("state")
            check("state", expect["backend_state"], int(raw) if raw and raw.isdigit() else raw)
        for key, want in expect.get("keys", {}).items():
            got = backend(key)
            if want == "*":
                seen.append(f"{key}={got!r}")
                if got is None:
                    diffs.append(f"{key}: expected present, observed absent")
            else:
                check(key, None if want is False else want, got)
        for key, want in expect.get("perms", {}).items():
            check(f"perms({key})", want.format(domid=self.domid), self._perms(key))
        if "error" in expect:
            error = backend("error")
            want = expect["error"]
            seen.append(f"error={error!r}")
            if want is True and not error:
                diffs.append("error: expected an error node, observed none")
            elif want is False and error:
                diffs.append(f"error: expected none, observed {error!r}")
            elif isinstance(want, str) and not (error and re.search(want, error)):
                diffs.append(f"error: expected /{want}/, observed {error!r}")
        if "handled" in expect:
            handled = self.backend.handled(self.host, expect["handled"], self.log_since)
            if handled is None:  # a back-end that does not log its machine: not judged
                seen.append("handled=n/a")
            else:
                check(f"handled({expect['handled']})", True, handled)
        if "status" in expect:
            got = self.observed.get("status")
            check("status", expect["status"], STATUS_NAMES.get(got, got) if got is not None
                  else "no response")
        if "verified" in expect:
            check("verified", expect["verified"], self.observed.get("verified"))
        if "refused" in expect:
            check("refused", expect["refused"], self.observed.get("refused"))
        if "ring_offered" in expect:
            check("ring_offered", expect["ring_offered"], self.observed.get("ring_offered"))
        if "tapdisks" in expect:
            check("tapdisks", expect["tapdisks"], self._tapdisks())
        if "alive" in expect:
            check("alive", expect["alive"], self.backend.alive(self.host))
        if "backend_dir" in expect:
            check("backend_dir", expect["backend_dir"], self._backend_dir())
        return diffs, ", ".join(seen)

    def _perms(self, key: str) -> str | None:
        assert self.paths is not None
        with self.host.xs() as xs:
            try:
                return ",".join(str(p) for p in xs.get_perms(self.paths.backend_key(key)))
            except XenStoreError:
                return None

    def _tapdisks(self) -> int:
        with contextlib.suppress(CtlError, OSError):
            return len({e.pid for e in ops.list_all(self.host.control_dir) if e.pid})
        return -1

    def _backend_dir(self) -> bool:
        assert self.paths is not None
        with self.host.xs() as xs:
            return bool(xs.exists(self.paths.backend))

    def settle(self, expect: Mapping[str, Any]) -> tuple[list[str], str]:
        """Compare until it matches or the timeout: a back-end answers asynchronously
        (what the action itself returned, e.g. an I/O status, is compared once)."""
        if set(expect) <= IMMEDIATE:
            return self.compare(expect)
        deadline = time.monotonic() + self.timeout
        watched = self.paths.backend if self.paths is not None else "/local/domain/0"
        with WatchStream(self.host.xs) as stream:
            stream.watch(watched, "settle")
            while True:
                diffs, seen = self.compare(expect)
                if not diffs or time.monotonic() >= deadline:
                    return diffs, seen
                # a watch event, or a look again soon (tapdisks leave no XenStore trace)
                stream.wait(min(0.1, max(0.0, deadline - time.monotonic())))

    def panics(self) -> list[str]:
        """Back-end states a personality that panics on them saw."""
        out = []
        for name, g in self.guests.items():
            allowed = g.personality.allowed_backend_states
            bad = [s for s in g.states.seen
                   if allowed and s is not None and (not s.isdigit() or int(s) not in allowed)]
            if bad:
                out.append(f"{name} panics: back-end state {bad[0]!r} "
                           f"(it handles {list(allowed)})")
        return out

    def deny_frontend_state(self, g: ScriptedGuest) -> None:
        """The back-end restarted behind a relay to xenstored, which then answers its
        reads of the front-end's state node EACCES (as xenstored answers an unprivileged
        back-end the guest locked out); the guest writes its state again to prompt it."""
        assert self.paths is not None and self.denier is None
        self.backend.stop(self.host)
        self.denier = DenyingXenStore(self.host.run_dir / "xenstored-denying.sock",
                                      self.host.xenstored_path)
        self.denier.start()
        self.backend.xenstored_via = self.denier.path
        self.backend.start(self.host)
        self.backend.wait_settled(self.host)
        state = self.paths.frontend_key("state")
        self.denier.deny(state)
        self._xs_write(lambda: g.xs.write(state, g.xs.read(state)))

    def honest(self) -> None:
        if self.liar is not None:
            self.liar.stop()
            self.liar = None

    def close(self) -> None:
        self.honest()
        self.backend.xenstored_via = None
        for g in self.guests.values():
            g.close()


def _seen(g: ScriptedGuest) -> str:
    return "->".join(str(s) for s in g.states.seen) or "nothing"


def _describe(expect: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in expect.items())


def run_scenario(scenario: Scenario, personalities: Mapping[str, Personality],
                 backend: Backend, *, workdir: Path, xenstored: Kind = "c",
                 timeout: float = 10.0) -> ScenarioResult:
    """Run one scenario on a fresh host in `workdir/<n>`; never raises for a failed step."""
    # The expected-failure marks say what OUR back-end lacks today; any other back-end
    # is judged plainly.
    if backend.name != "ours":
        scenario = replace(scenario, xfail=None,
                           steps=tuple(replace(s, xfail=None) for s in scenario.steps))
    result = ScenarioResult(scenario, backend.name, xenstored)
    host = Host(workdir / "h")
    host.up(xenstored, toolstack=scenario.toolstack)
    run = _Run(scenario, personalities, backend, host, timeout)
    try:
        backend.start(host)
        failed = False
        for i, step in enumerate(scenario.steps, 1):
            owner = str(step.params.get("personality", scenario.personality))
            subs = _expand(step, personalities[owner])
            for j, (sub, label) in enumerate(subs, 1):
                index = f"{i}" if len(subs) == 1 else f"{i}.{j}"
                if failed:
                    result.steps.append(StepVerdict(index, label, "skip"))
                    continue
                last = j == len(subs)
                expect = step.expect if last else sub.expect
                verdict = _run_step(run, sub, owner, expect, index, label,
                                    step.xfail or scenario.xfail, bool(step.xfail))
                result.steps.append(verdict)
                # A step known to fail on its own (its `xfail`) does not stop the rest.
                failed = verdict.verdict == "FAIL" or (
                    verdict.verdict == "xfail" and not step.xfail)
    finally:
        result.seen_states = next(iter(run.guests.values())).states.seen if run.guests else []
        for g in run.guests.values():
            result.frontend_lines += frontend_lines(g.states.timeline)
        run.close()
        with contextlib.suppress(Exception):
            backend.stop(host)
        if run.denier is not None:
            run.denier.stop()
        log = backend.log_path(host)
        if log is not None and log.exists():
            result.coverage_lines = _step_lines(log)
        with contextlib.suppress(Exception):
            host.stop_tapdisks()
        host.down()
    return result


def _expand(step: Step, personality: Personality) -> list[tuple[Step, str]]:
    if step.do in personality.routines:
        return [(s, f"{step.do}/{s.label()}") for s in personality.routines[step.do]]
    return [(step, step.label())]


def _run_step(run: _Run, step: Step, owner: str, expect: Mapping[str, Any], index: str,
              label: str, xfail: str | None, strict: bool = False) -> StepVerdict:
    """`xfail`: why this step (or its scenario) is known to fail; `strict`: the mark is
    the step's own, so a pass is reported (XPASS: the mark is stale)."""
    try:
        run.act(step, owner)
        diffs, seen = run.settle(expect) if expect else ([], "")
    except (StepFailed, GuestFault) as e:
        diffs, seen = [str(e)], str(e)
    except Exception as e:  # whatever a back-end does makes a verdict, never a crash
        diffs, seen = [f"{type(e).__name__}: {e}"], f"{type(e).__name__}: {e}"
    diffs += run.panics()
    expected = _describe(expect) or "done"
    if diffs:
        verdict = "xfail" if xfail is not None else "FAIL"
        return StepVerdict(index, label, verdict, expected, seen, tuple(diffs))
    if strict and xfail is not None:
        return StepVerdict(index, label, "XPASS", expected, seen or "done",
                           (f"passes though marked: {xfail}",))
    return StepVerdict(index, label, "pass", expected, seen or "done")


def _step_lines(log: Path) -> list[dict[str, Any]]:
    out = []
    with open(log) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") in ("step", "no step"):
                    out.append(entry)
    return out

