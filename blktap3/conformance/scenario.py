"""Conformance scenarios and front-end personalities as data (specs/conformance/), checked.

A *personality* (`specs/conformance/personalities/<name>.toml`) is one real blkfront's
habits, with the driver's source cited: its own ring-order limit, the `protocol` it
writes, extra keys, the back-end states it tolerates (NetBSD panics on any other), and
named *routines* (handshake, close, ...) written as steps.

A *scenario* (`specs/conformance/scenarios/<name>.toml`) names a personality and a list
of steps. A step is an action (`do`), its parameters, and what must be observed once it
is done (`expect`): back-end state, back-end keys and their permissions, the `error`
node, the status of an I/O, whether a XenStore write was refused, tapdisks left.
A step whose `do` names a routine of the personality runs that routine's steps.
`xfail = "why"` on a scenario (or a step) says it is known to fail today, and why.

Everything is validated at load: an unknown action, parameter or expectation is a
`ScenarioError` naming the file and the step, never a surprise in the middle of a run.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from blktap3.abi import BlkifOp, BlkifStatus
from blktap3.vbd3.disk import TOOLSTACKS

PACKAGE = "blktap3.specs"
DIRECTORY = "conformance"

# action -> its parameters and their types (a tuple: any of these)
ACTIONS: dict[str, dict[str, tuple[type, ...]]] = {
    "attach": {"mode": (str,), "cdrom": (bool,), "size_mib": (int,), "hotplug": (bool,),
               "frontend_state": (bool,), "memory_pages": (int,)},
    "hotplug": {},
    "toolstack_write": {"key": (str,), "value": (str,)},
    "wait_backend": {"states": (list,)},
    "open_ring": {"order": (int,), "queues": (int,)},
    "write_transport": {"tx": (bool,), "state": (int,), "omit": (list,),
                        "override": (dict,), "legacy_pages": (bool,)},
    "set_state": {"state": (int,), "tx": (bool,)},
    "read_backend": {"keys": (list,), "optional": (list,)},
    "io": {"op": (str,), "sector": (int,), "count": (int,)},
    "raw_request": {"op": (int,), "segs": (list,), "nr_segments": (int,), "sector": (int,),
                    "nr_sectors": (int,), "gref": (str,)},
    "overflow": {},
    "release_ring": {},
    "write_key": {"dir": (str,), "key": (str,), "value": (str,)},
    "remove_key": {"dir": (str,), "key": (str,)},
    "resize": {"size_mib": (int,)},
    "kill_tapdisk": {},
    "restart_backend": {},
    "stop_backend": {},
    "start_backend": {},
    "tapdisk_disconnect": {},
    "tapdisk_lies": {"sector_size": (int,)},
    "tapdisk_honest": {},
    "deny_frontend_state": {},
    "destroy_domain": {},
    "detach": {},
}
DIRS = ("frontend", "backend")
IO_OPS = ("write", "read", "flush")
STATUSES = {s.name.lower(): int(s) for s in BlkifStatus}  # okay, error, eopnotsupp
# A flush a front-end may send: the back-end's key that offers it, and the request.
FLUSH_FEATURES = {"flush-cache": ("feature-flush-cache", BlkifOp.FLUSH_DISKCACHE),
                  "barrier": ("feature-barrier", BlkifOp.WRITE_BARRIER)}
NOT_OFFERED = "not offered"  # an io flush's status when the back-end offers no flush
EXPECTS: dict[str, tuple[type, ...]] = {
    "backend_state": (int,),
    "keys": (dict,),
    "perms": (dict,),
    "error": (bool, str),
    "status": (str,),
    "refused": (bool,),
    "tapdisks": (int,),
    "backend_dir": (bool,),
    "alive": (bool,),
    "verified": (bool,),
    "handled": (str,),
    "ring_offered": (bool,),
}


class ScenarioError(ValueError):
    """A scenario or personality file that does not say something runnable."""


@dataclass(frozen=True)
class Step:
    do: str
    params: Mapping[str, Any] = field(default_factory=dict)
    expect: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""
    xfail: str | None = None

    def label(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.do}({args})" if args else self.do


@dataclass(frozen=True)
class Personality:
    name: str
    driver: str
    source: str  # where the habits were read: repository, file, functions
    doc: str
    max_ring_page_order: int
    protocol: str | None  # None: the key is left out (the back-end's native layout)
    extra_keys: Mapping[str, str]
    allowed_backend_states: tuple[int, ...]  # empty: any; else any other is a panic
    routines: Mapping[str, tuple[Step, ...]]
    # Multi-queue: the most queues it asks (Linux blkfront's max_queues, 4 by default;
    # 1: it never writes multi-queue-num-queues).
    max_queues: int = 1
    # How it flushes: the features it uses, in its order of preference (FLUSH_FEATURES);
    # `flush_each`: it sends one request per feature offered (Mini-OS), else only the
    # first offered (Linux, FreeBSD, Windows, NetBSD).
    flush: tuple[str, ...] = ("flush-cache", "barrier")
    flush_each: bool = False


@dataclass(frozen=True)
class Scenario:
    name: str
    personality: str
    doc: str
    kind: str  # handshake | lifecycle | hostile
    steps: tuple[Step, ...]
    xfail: str | None = None
    toolstack: str = "xapi"  # whose order the host's toolstack and the back-end follow


def _check(where: str, data: Mapping[str, Any], allowed: Mapping[str, tuple[type, ...]],
           required: tuple[str, ...] = ()) -> None:
    for key in required:
        if key not in data:
            raise ScenarioError(f"{where}: {key!r} is required")
    for key, value in data.items():
        if key not in allowed:
            raise ScenarioError(f"{where}: unknown key {key!r} (known: {', '.join(allowed)})")
        kinds = allowed[key]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ScenarioError(f"{where}: {key} must be {names}, not {value!r}")


def parse_step(where: str, raw: Any, routines: tuple[str, ...]) -> Step:
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: a step is a table")
    raw = dict(raw)
    do = raw.pop("do", None)
    expect = raw.pop("expect", {})
    doc = raw.pop("doc", "")
    xfail = raw.pop("xfail", None)
    if not isinstance(do, str):
        raise ScenarioError(f"{where}: `do` names an action or a routine")
    # `personality`: which blkfront of the domain does the step (OVMF's, then the OS's)
    if do in ACTIONS:
        _check(f"{where} ({do})", raw, {**ACTIONS[do], "personality": (str,)})
    elif do in routines:
        _check(f"{where} ({do})", raw, {"personality": (str,)})
    else:
        raise ScenarioError(f"{where}: unknown action {do!r} (actions: {', '.join(ACTIONS)}; "
                            f"routines: {', '.join(routines)})")
    if not isinstance(expect, dict):
        raise ScenarioError(f"{where}: expect is a table")
    _check(f"{where} expect", expect, EXPECTS)
    if "status" in expect and expect["status"] not in STATUSES:
        raise ScenarioError(f"{where}: status is one of {', '.join(STATUSES)}")
    for table in ("keys", "perms"):
        for key, value in expect.get(table, {}).items():
            if not (isinstance(value, str) or value is False):
                raise ScenarioError(f"{where}: expect.{table}.{key} is a string or false")
    if raw.get("dir", "backend") not in DIRS:
        raise ScenarioError(f"{where}: dir is one of {DIRS}")
    if do == "io" and raw.get("op", "write") not in IO_OPS:
        raise ScenarioError(f"{where}: an io op is one of {IO_OPS}")
    if not isinstance(doc, str) or not (xfail is None or isinstance(xfail, str)):
        raise ScenarioError(f"{where}: doc and xfail are strings")
    return Step(do, raw, expect, doc, xfail)


ROUTINES = ("handshake", "close", "reconnect", "exit_boot_services")


def parse_personality(data: Mapping[str, Any], name: str) -> Personality:
    where = f"personality {name}"
    _check(where, data, {"personality": (dict,), "routines": (dict,)}, ("personality", "routines"))
    p = data["personality"]
    _check(where, p, {"name": (str,), "driver": (str,), "source": (str,), "doc": (str,),
                      "max_ring_page_order": (int,), "protocol": (str,),
                      "max_queues": (int,), "flush": (list,), "flush_each": (bool,),
                      "extra_keys": (dict,), "allowed_backend_states": (list,)},
           ("name", "driver", "source", "doc", "max_ring_page_order", "protocol"))
    if p["name"] != name:
        raise ScenarioError(f"{where}: the file names itself {p['name']!r}")
    if not p["source"].strip():
        raise ScenarioError(f"{where}: cite the driver's source")
    routines: dict[str, tuple[Step, ...]] = {}
    for rname, steps in data["routines"].items():
        if rname not in ROUTINES or not isinstance(steps, list):
            raise ScenarioError(f"{where}: routine {rname!r}: one of {ROUTINES}, a list of steps")
        routines[rname] = tuple(parse_step(f"{where} {rname}[{i}]", s, ())
                                for i, s in enumerate(steps))
    if "handshake" not in routines:
        raise ScenarioError(f"{where}: no handshake routine")
    states = p.get("allowed_backend_states", [])
    if not all(isinstance(s, int) and 0 <= s <= 8 for s in states):
        raise ScenarioError(f"{where}: allowed_backend_states are xenbus states 0..8")
    flush = tuple(p.get("flush", Personality.flush))
    if not flush or not set(flush) <= set(FLUSH_FEATURES):
        raise ScenarioError(f"{where}: flush names some of {list(FLUSH_FEATURES)}")
    return Personality(
        name=name, driver=p["driver"], source=p["source"], doc=p["doc"],
        max_ring_page_order=p["max_ring_page_order"], protocol=p["protocol"] or None,
        extra_keys={str(k): str(v) for k, v in p.get("extra_keys", {}).items()},
        allowed_backend_states=tuple(states), routines=routines,
        max_queues=p.get("max_queues", 1), flush=flush,
        flush_each=p.get("flush_each", False))


KINDS = ("handshake", "lifecycle", "hostile")


def parse_scenario(data: Mapping[str, Any], name: str, personalities: Mapping[str, Personality]
                   ) -> Scenario:
    where = f"scenario {name}"
    _check(where, data, {"scenario": (dict,), "steps": (list,)}, ("scenario", "steps"))
    s = data["scenario"]
    _check(where, s, {"name": (str,), "personality": (str,), "doc": (str,), "kind": (str,),
                      "xfail": (str,), "toolstack": (str,)},
           ("name", "personality", "doc", "kind"))
    if s["name"] != name:
        raise ScenarioError(f"{where}: the file names itself {s['name']!r}")
    if s["personality"] not in personalities:
        raise ScenarioError(f"{where}: unknown personality {s['personality']!r}")
    if s["kind"] not in KINDS:
        raise ScenarioError(f"{where}: kind is one of {KINDS}")
    if s.get("toolstack", "xapi") not in TOOLSTACKS:
        raise ScenarioError(f"{where}: toolstack is one of {TOOLSTACKS}")
    steps = []
    for i, raw in enumerate(data["steps"]):
        step = parse_step(f"{where} step {i + 1}", raw, ROUTINES)
        owner = personalities.get(str(step.params.get("personality", s["personality"])))
        if owner is None:
            raise ScenarioError(f"{where} step {i + 1}: unknown personality")
        if step.do in ROUTINES and step.do not in owner.routines:
            raise ScenarioError(f"{where} step {i + 1}: {owner.name} has no {step.do} routine")
        steps.append(step)
    if not steps or steps[0].do != "attach":
        raise ScenarioError(f"{where}: the first step attaches the disk")
    return Scenario(name=name, personality=s["personality"], doc=s["doc"], kind=s["kind"],
                    steps=tuple(steps), xfail=s.get("xfail"),
                    toolstack=s.get("toolstack", "xapi"))


def _toml_files(sub: str) -> dict[str, Any]:
    root = files(PACKAGE).joinpath(DIRECTORY, sub)
    out = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            try:
                out[entry.name[:-5]] = tomllib.loads(entry.read_text())
            except tomllib.TOMLDecodeError as e:
                raise ScenarioError(f"{DIRECTORY}/{sub}/{entry.name}: {e}") from None
    return out


def load_personalities() -> dict[str, Personality]:
    return {n: parse_personality(d, n) for n, d in _toml_files("personalities").items()}


def load_scenarios(personalities: Mapping[str, Personality] | None = None) -> list[Scenario]:
    known = personalities if personalities is not None else load_personalities()
    return [parse_scenario(d, n, known) for n, d in _toml_files("scenarios").items()]
