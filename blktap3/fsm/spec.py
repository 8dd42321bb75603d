"""Machine specs: the TOML files in `specs/`, loaded and checked against a schema.

A spec is the single truth a machine, its diagram and the conformance harness read.
Format (one file per machine, `specs/<name>.toml`):

    [machine]      name, title, doc, initial, final = [...], nested = bool
    [states.<s>]   doc, xenbus (0..8: entering publishes it), bits = [...],
                   on_enter = [...], on_exit = [...], initial + [states.<s>.children.<c>],
                   awaits = [...]: the state is only ever entered with a question
                   pending (an effect the owner answers before anything else, see
                   `blktap3.fsm`), whose answer is one of these triggers
    [phases.<p>]   doc, states = [...]: a named group of states (flat machines only);
                   when a machine declares phases, every state is in exactly one
    [triggers.<t>] doc, blame = ours|frontend|backend|tapdisk|image|toolstack,
                   refused = true: never allowed (its error names the culprit),
                   errno = "E...": the trigger is a request that always gets an answer;
                   where no row takes it, the machine stays and answers this errno
    [[transitions]] trigger, source (name, list or "*"), dest (absent: internal),
                   conditions, unless, before, after (callback names), doc,
                   errno = "E...": a refusing row (internal, no callbacks): when its
                   conditions hold the machine stays and answers this errno
    [[ignore]]     triggers, source, why: explicit "seen and deliberately ignored";
                   applied after the transitions, so they are the fallback when the
                   conditions of every transition for that trigger fail.

An `errno` is a name of Python's `errno` module (`"EALREADY"`), checked at load; the
answer is a `Reply(error=...)` effect (see `blktap3.fsm.machine`).
A source names states, `@<phase>` for every state of a phase (`["@handshake", "closed"]`;
`@` cannot start a state name, so the two never clash), or is "*": every non-final state.
A group (`@<phase>`, "*") leaves out the states that `awaits` an answer: nothing but
the answer arrives there, so a row for any other trigger could never fire; a row for an
answer names its state (`blktap3-fsm check` reports a dead row naming one itself).
The loader expands phases: `TransitionSpec.sources` are always states, so the machine,
the checks and the conformance harness see the same table whichever way a row is
written; phases change how a spec reads and how it is drawn, never what the machine does.
Nested states are named `<parent>_<child>` (transitions' separator), so names in a nested
machine may not contain `_`.  Callback names are bound to methods of the machine class by
`blktap3.fsm.machine`; this module checks only the spec's own consistency.
"""

from __future__ import annotations

import errno as errno_module
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .errors import Blame, SpecError

_TOP_KEYS = {"machine", "states", "phases", "triggers", "transitions", "ignore"}
_MACHINE_KEYS = {"name", "title", "doc", "initial", "final", "nested"}
_STATE_KEYS = {"doc", "xenbus", "bits", "on_enter", "on_exit", "initial", "children", "awaits"}
_TRIGGER_KEYS = {"doc", "blame", "refused", "errno"}
_TRANSITION_KEYS = {
    "trigger", "source", "dest", "conditions", "unless", "before", "after", "doc", "errno"
}
_IGNORE_KEYS = {"triggers", "source", "why"}
_PHASE_KEYS = {"doc", "states"}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_NESTED_NAME = re.compile(r"^[a-z][a-z0-9]*$")
SEPARATOR = "_"
PHASE_PREFIX = "@"  # in a source: every state of the phase
_ROW_HEADER = re.compile(r"^\s*\[\[\s*(transitions|ignore)\s*\]\]")


@dataclass(frozen=True)
class StateSpec:
    name: str  # full name (`parent_child` when nested)
    local: str  # name inside its parent
    doc: str = ""
    xenbus: int | None = None
    bits: tuple[str, ...] = ()
    on_enter: tuple[str, ...] = ()
    on_exit: tuple[str, ...] = ()
    initial: str | None = None  # full name of the initial child
    children: tuple[StateSpec, ...] = ()
    awaits: tuple[str, ...] = ()  # the only triggers that can arrive (answers)


@dataclass(frozen=True)
class PhaseSpec:
    """A named group of states: a step of the machine's life, drawn as one cluster."""

    name: str
    states: tuple[str, ...]
    doc: str = ""


@dataclass(frozen=True)
class TriggerSpec:
    name: str
    blame: Blame
    doc: str = ""
    refused: bool = False
    errno: int | None = None  # a request: refused where no row takes it, with this errno


@dataclass(frozen=True)
class TransitionSpec:
    trigger: str
    sources: tuple[str, ...]
    dest: str | None  # None: internal transition (no exit, no enter)
    conditions: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    doc: str = ""
    ignored: bool = False  # comes from an [[ignore]] entry
    errno: int | None = None  # a refusing row: stays and answers this errno
    # where the row is and how its source was written (`@phase` unexpanded): for messages
    row: str = field(default="", compare=False)
    spelled: tuple[str, ...] = field(default=(), compare=False)

    @property
    def callbacks(self) -> tuple[str, ...]:
        return self.conditions + self.unless + self.before + self.after


@dataclass(frozen=True)
class MachineSpec:
    name: str
    title: str
    initial: str
    doc: str = ""
    final: tuple[str, ...] = ()
    nested: bool = False
    states: tuple[StateSpec, ...] = ()  # top level; children inside
    phases: tuple[PhaseSpec, ...] = ()  # empty, or a partition of the states
    triggers: Mapping[str, TriggerSpec] = field(default_factory=dict)
    transitions: tuple[TransitionSpec, ...] = ()  # handled first, then the ignores

    def all_states(self) -> Iterator[StateSpec]:
        """Every state, parents before their children."""
        return _walk(self.states)

    def state(self, name: str) -> StateSpec:
        for s in self.all_states():
            if s.name == name:
                return s
        raise KeyError(name)

    def leaves(self) -> list[str]:
        return [s.name for s in self.all_states() if not s.children]

    def awaiting(self) -> dict[str, tuple[str, ...]]:
        """State -> the answer triggers it awaits, for the states that await one."""
        return {s.name: s.awaits for s in self.all_states() if s.awaits}

    def entry_leaf(self, name: str) -> str:
        """The leaf a machine is in after entering `name` (initial children, down)."""
        state = self.state(name)
        while state.children:
            assert state.initial is not None  # the schema requires it
            state = self.state(state.initial)
        return state.name

    def phase(self, name: str) -> PhaseSpec:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)

    def phase_of(self, state: str) -> PhaseSpec | None:
        """The phase holding `state`; None when the machine declares no phases."""
        for p in self.phases:
            if state in p.states:
                return p
        if self.phases:
            raise KeyError(state)
        return None

    def callback_names(self) -> set[str]:
        names = {n for t in self.transitions for n in t.callbacks}
        for s in self.all_states():
            names.update(s.on_enter, s.on_exit)
        return names


def _walk(states: tuple[StateSpec, ...]) -> Iterator[StateSpec]:
    for s in states:
        yield s
        yield from _walk(s.children)


# --- loading ---------------------------------------------------------------------------------


def _strs(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SpecError(f"{where}: expected a name or a list of names, got {value!r}")


def _errno(where: str, value: Any) -> int | None:
    """An `errno = "E..."` value as its number (None when absent)."""
    if value is None:
        return None
    code = getattr(errno_module, value, None) if isinstance(value, str) else None
    if not isinstance(code, int) or errno_module.errorcode.get(code) is None:
        raise SpecError(f"{where}: errno {value!r} is not a name of the errno module")
    return code


def _check_keys(
    where: str, table: Any, allowed: set[str], required: frozenset[str] = frozenset()
) -> None:
    if not isinstance(table, dict):
        raise SpecError(f"{where}: expected a table, got {table!r}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(table))
    if missing:
        raise SpecError(f"{where}: missing key(s) {missing}")


def _parse_state(
    where: str, name: str, table: Any, parent: str | None, nested: bool
) -> StateSpec:
    _check_keys(where, table, _STATE_KEYS)
    pattern = _NESTED_NAME if nested else _NAME
    if not pattern.match(name):
        rule = "lower-case letters and digits" if nested else "lower-case, digits, _"
        raise SpecError(f"{where}: bad state name {name!r} ({rule})")
    full = f"{parent}{SEPARATOR}{name}" if parent else name
    xenbus = table.get("xenbus")
    if xenbus is not None and (not isinstance(xenbus, int) or not 0 <= xenbus <= 8):
        raise SpecError(f"{where}: xenbus must be an integer 0..8, got {xenbus!r}")
    children_table = table.get("children", {})
    if not isinstance(children_table, dict):
        raise SpecError(f"{where}.children: expected a table")
    if children_table and not nested:
        raise SpecError(f"{where}: children need `nested = true` in [machine]")
    children = tuple(
        _parse_state(f"{where}.children.{c}", c, t, full, nested)
        for c, t in children_table.items()
    )
    initial = table.get("initial")
    if children:
        if not isinstance(initial, str) or initial not in children_table:
            raise SpecError(f"{where}: initial must name one of its children, got {initial!r}")
        initial = f"{full}{SEPARATOR}{initial}"
    elif initial is not None:
        raise SpecError(f"{where}: initial given but the state has no children")
    return StateSpec(
        name=full,
        local=name,
        doc=str(table.get("doc", "")),
        xenbus=xenbus,
        bits=_strs(f"{where}.bits", table.get("bits", [])),
        on_enter=_strs(f"{where}.on_enter", table.get("on_enter", [])),
        on_exit=_strs(f"{where}.on_exit", table.get("on_exit", [])),
        initial=initial,
        children=children,
        awaits=_strs(f"{where}.awaits", table.get("awaits", [])),
    )


def _parse_phases(
    origin: str, table: Any, names: list[str], nested: bool
) -> tuple[PhaseSpec, ...]:
    """The [phases] table: named groups that partition the states (in spec order)."""
    if not isinstance(table, dict):
        raise SpecError(f"{origin}: [phases] must be a table of phases")
    if table and nested:
        raise SpecError(f"{origin}: [phases] need a flat machine (nested states group already)")
    phases: list[PhaseSpec] = []
    owner: dict[str, str] = {}
    for pname, p in table.items():
        where = f"{origin}: [phases.{pname}]"
        _check_keys(where, p, _PHASE_KEYS, frozenset({"states"}))
        if not _NAME.match(pname):
            raise SpecError(f"{where}: bad phase name {pname!r} (lower-case, digits, _)")
        members = _strs(f"{where}.states", p["states"])
        if not members:
            raise SpecError(f"{where}: a phase needs at least one state")
        for s in members:
            if s not in names:
                raise SpecError(f"{where}: undefined state {s!r}; defined: {sorted(names)}")
            if s in owner:
                raise SpecError(
                    f"{where}: state {s!r} is already in phase {owner[s]!r} "
                    "(every state is in exactly one phase)")
            owner[s] = pname
        phases.append(PhaseSpec(pname, members, str(p.get("doc", ""))))
    homeless = [n for n in names if n not in owner]
    if phases and homeless:
        raise SpecError(
            f"{origin}: [phases]: state(s) {homeless} in no phase "
            "(when a machine declares phases, every state is in exactly one)")
    return tuple(phases)


def row_lines(text: str) -> dict[str, list[int]]:
    """Line numbers (1-based) of the `[[transitions]]` and `[[ignore]]` headers, in order."""
    lines: dict[str, list[int]] = {"transitions": [], "ignore": []}
    for number, line in enumerate(text.splitlines(), 1):
        m = _ROW_HEADER.match(line)
        if m:
            lines[m.group(1)].append(number)
    return lines


def parse_spec(
    data: Mapping[str, Any],
    origin: str = "<spec>",
    lines: Mapping[str, list[int]] | None = None,
) -> MachineSpec:
    """Build a `MachineSpec` from parsed TOML, raising `SpecError` with the location.

    `lines` (from `row_lines` of the same text) adds each row's line to its messages.
    """
    _check_keys(
        origin, dict(data), _TOP_KEYS, frozenset({"machine", "states", "triggers", "transitions"})
    )
    m = data["machine"]
    _check_keys(f"{origin}: [machine]", m, _MACHINE_KEYS, frozenset({"name", "initial"}))
    nested = bool(m.get("nested", False))
    states_table = data["states"]
    if not isinstance(states_table, dict) or not states_table:
        raise SpecError(f"{origin}: [states] must define at least one state")
    states = tuple(
        _parse_state(f"{origin}: [states.{n}]", n, t, None, nested)
        for n, t in states_table.items()
    )
    names: set[str] = set()
    for s in _walk(states):
        if s.name in names:
            raise SpecError(f"{origin}: state {s.name!r} defined twice")
        names.add(s.name)

    def known(where: str, name: str) -> str:
        if name not in names:
            raise SpecError(f"{where}: undefined state {name!r}; defined: {sorted(names)}")
        return name

    phases = _parse_phases(origin, data.get("phases", {}), [s.name for s in _walk(states)],
                           nested)
    by_phase = {p.name: p for p in phases}

    def row(kind: str, i: int) -> str:
        found = (lines or {}).get(kind, [])
        rows = data.get(kind, [])
        at = f":{found[i]}" if isinstance(rows, list) and len(found) == len(rows) else ""
        return f"{origin}{at}: {kind}[{i}]"

    triggers: dict[str, TriggerSpec] = {}
    for tname, t in data["triggers"].items():
        where = f"{origin}: [triggers.{tname}]"
        _check_keys(where, t, _TRIGGER_KEYS, frozenset({"blame"}))
        if not _NAME.match(tname):
            raise SpecError(f"{where}: bad trigger name")
        try:
            blame = Blame(t["blame"])
        except ValueError:
            choices = [b.value for b in Blame]
            raise SpecError(f"{where}: blame {t['blame']!r} is not one of {choices}") from None
        refused = bool(t.get("refused", False))
        code = _errno(f"{where}.errno", t.get("errno"))
        if refused and code is not None:
            raise SpecError(f"{where}: a refused trigger has no errno (it is never answered)")
        triggers[tname] = TriggerSpec(tname, blame, str(t.get("doc", "")), refused, code)

    def trigger(where: str, name: Any) -> str:
        if not isinstance(name, str):
            raise SpecError(f"{where}: trigger must be one name, got {name!r}")
        if name not in triggers:
            raise SpecError(f"{where}: undeclared trigger {name!r} (add it under [triggers])")
        return name

    final = tuple(
        known(f"{origin}: [machine].final", f) for f in _strs("final", m.get("final", []))
    )
    awaiting: set[str] = set()
    for s in _walk(states):
        for name in s.awaits:
            trigger(f"{origin}: [states.{s.name}].awaits", name)
        if s.awaits and (s.name in final or s.children):
            raise SpecError(f"{origin}: [states.{s.name}]: only a non-final leaf may await")
        if s.awaits:
            awaiting.add(s.name)

    def sources(where: str, value: Any) -> tuple[str, ...]:
        if value == "*":
            return tuple(sorted(s.name for s in _walk(states)
                                if s.name not in final and s.name not in awaiting))
        expanded: list[str] = []
        for n in _strs(where, value):
            if n.startswith(PHASE_PREFIX):
                phase = by_phase.get(n.removeprefix(PHASE_PREFIX))
                if phase is None:
                    known_phases = [f"{PHASE_PREFIX}{p}" for p in by_phase] or "none declared"
                    raise SpecError(f"{where}: unknown phase {n!r}; phases: {known_phases}")
                members = tuple(s for s in phase.states if s not in awaiting)
                if not members:
                    raise SpecError(f"{where}: every state of phase {n!r} awaits an answer: "
                                    "name the state a row for its answer is for")
            else:
                members = (known(where, n),)
            for s in members:
                if s in expanded:
                    raise SpecError(f"{where}: state {s!r} named twice in source {value!r}")
                expanded.append(s)
        return tuple(expanded)

    def spelled(value: Any) -> tuple[str, ...]:
        return (value,) if value == "*" else _strs("source", value)

    transitions: list[TransitionSpec] = []
    for i, t in enumerate(data["transitions"]):
        where = row("transitions", i)
        _check_keys(where, t, _TRANSITION_KEYS, frozenset({"trigger", "source"}))
        dest = t.get("dest")
        code = _errno(f"{where}.errno", t.get("errno"))
        if code is not None and (dest is not None or t.get("before") or t.get("after")):
            raise SpecError(f"{where}: a row with errno refuses: no dest, before or after")
        transitions.append(
            TransitionSpec(
                trigger=trigger(where, t["trigger"]),
                sources=sources(where, t["source"]),
                dest=known(where, dest) if dest is not None else None,
                conditions=_strs(f"{where}.conditions", t.get("conditions", [])),
                unless=_strs(f"{where}.unless", t.get("unless", [])),
                before=_strs(f"{where}.before", t.get("before", [])),
                after=_strs(f"{where}.after", t.get("after", [])),
                doc=str(t.get("doc", "")),
                errno=code,
                row=where,
                spelled=spelled(t["source"]),
            )
        )
    for i, ig in enumerate(data.get("ignore", [])):
        where = row("ignore", i)
        _check_keys(where, ig, _IGNORE_KEYS, frozenset({"triggers", "source", "why"}))
        srcs = sources(where, ig["source"])
        for tname in _strs(f"{where}.triggers", ig["triggers"]):
            transitions.append(
                TransitionSpec(trigger(where, tname), srcs, None, doc=str(ig["why"]), ignored=True,
                               row=where, spelled=spelled(ig["source"]))
            )
    used = {t.trigger for t in transitions}
    unused = sorted(n for n, t in triggers.items() if n not in used and not t.refused)
    if unused:
        raise SpecError(f"{origin}: trigger(s) declared but never used: {unused}")
    refused_used = sorted(n for n, t in triggers.items() if n in used and t.refused)
    if refused_used:
        raise SpecError(f"{origin}: trigger(s) marked refused but used: {refused_used}")
    clashes = sorted(set(triggers) & {n for t in transitions for n in t.callbacks})
    if clashes:
        raise SpecError(f"{origin}: callback names equal to trigger names: {clashes}")
    return MachineSpec(
        name=str(m["name"]),
        title=str(m.get("title", m["name"])),
        doc=str(m.get("doc", "")),
        initial=known(f"{origin}: [machine].initial", m["initial"]),
        final=final,
        nested=nested,
        states=states,
        phases=phases,
        triggers=triggers,
        transitions=tuple(transitions),
    )


def _spec_dir() -> Path:
    """The `blktap3.specs` package's directory (installed, or `specs/` of an editable
    tree). Its path, not `importlib.resources`: that module (tempfile, shutil, zipfile)
    would cost every tapdisk's start-up more than reading its two specs does."""
    import importlib

    init = importlib.import_module("blktap3.specs").__file__
    assert init is not None  # a regular package (specs/__init__.py)
    return Path(init).parent


def spec_names() -> list[str]:
    """Names of the machine specs shipped in `blktap3.specs`."""
    return sorted(p.name.removesuffix(".toml") for p in _spec_dir().iterdir()
                  if p.name.endswith(".toml"))


@cache
def load_spec(name: str) -> MachineSpec:
    """Load `specs/<name>.toml` (installed or editable), schema-checked."""
    resource = _spec_dir() / f"{name}.toml"
    if not resource.is_file():
        raise SpecError(f"no machine spec {name!r}; known: {spec_names()}")
    text = resource.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{name}.toml: {e}") from None
    spec = parse_spec(data, f"{name}.toml", row_lines(text))
    if spec.name != name:
        raise SpecError(f"{name}.toml: [machine].name is {spec.name!r}, expected {name!r}")
    return spec
