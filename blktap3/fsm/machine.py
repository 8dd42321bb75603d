"""The one place where a spec becomes a running `transitions` machine.

Rules (the h11 "theory of operation" for our machines):

1. Every state change is declared in a spec; no code outside a spec moves a machine.
2. `handle(event)` is the only entry point.  It fires the event's trigger and returns the
   effects the callbacks recorded, in order.  Nothing here does I/O.
3. An event the spec does not allow in the current state raises the `FsmError` subclass
   its trigger's `blame` names, and leaves the machine untouched; so does an event whose
   transitions all had failing conditions (e.g. CLOSE while draining, without force).
   A request (a trigger with `errno`) is answered instead: the machine stays and returns
   `Reply(error=errno)`; so does a refusing row (a row with `errno`) whose conditions
   hold.  Every refusal of a request is thus a row or the trigger's errno in the spec.
4. Publication rule: entering a state that declares `xenbus = n` publishes n, unless n is
   what was last published.  So a machine can never write a redundant `state`.  The
   publication comes after the state's own `on_enter` effects (keys first, then state).
5. A state that `awaits` answers (it is entered with a question pending: the owner
   answers before feeding anything else) accepts only those: any other event there is
   `OurBug`, whoever its trigger would blame, and changes nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, ClassVar

from transitions import Machine, MachineError
from transitions.extensions import HierarchicalMachine

from .effects import Effect, PublishState, Reply
from .errors import ERROR_FOR_BLAME, OurBug, SpecError
from .events import Event
from .spec import MachineSpec, StateSpec, TransitionSpec, load_spec
from .xenbus_state import XenbusState

Callback = Callable[..., Any]


def unbound_callbacks(spec: MachineSpec, cls: type) -> list[str]:
    """Callback and condition names of `spec` that are not methods of `cls`."""
    return sorted(n for n in spec.callback_names() if not callable(getattr(cls, n, None)))


def state_names_mismatch(spec: MachineSpec, states: type[enum.StrEnum]) -> str:
    """Why `states` (a machine's names for its states in code) disagrees with its spec."""
    declared, named = set(spec.leaves()), {s.value for s in states}
    missing, unknown = sorted(declared - named), sorted(named - declared)
    if not missing and not unknown:
        return ""
    return f"{states.__name__} lacks {missing}, names states not in the spec {unknown}"


_CHECKED: dict[type, MachineSpec] = {}


def _checked(cls: type[SpecMachine]) -> MachineSpec:
    """The spec of `cls`, checked once against the class: callbacks and state names."""
    if cls in _CHECKED:
        return _CHECKED[cls]
    spec = load_spec(cls.SPEC)
    missing = unbound_callbacks(spec, cls)
    if missing:
        raise SpecError(f"{cls.SPEC}: callbacks not bound by {cls.__name__}: {missing}")
    why = state_names_mismatch(spec, cls.STATES)
    if why:
        raise SpecError(f"{cls.SPEC}: {why}")
    _CHECKED[cls] = spec
    return spec


class SpecMachine:
    """Base class of the machines: the instance is the `transitions` model.

    Subclasses set `SPEC` (the spec file's name) and `STATES` (a StrEnum naming every
    leaf state of the spec: code compares `machine.state` with its members, never with a
    bare string; both sets must match, checked when the first machine is made) and define
    the callbacks the spec names; each callback takes the triggering event as keyword
    `event` and records effects with `self.emit`.
    """

    SPEC: ClassVar[str] = ""
    STATES: ClassVar[type[enum.StrEnum]]
    # What the `state` node holds before the machine publishes anything (the toolstack
    # writes 1 when it creates a device); None for machines without a `state` node.
    INITIAL_PUBLISHED: ClassVar[XenbusState | None] = None
    state: str  # set by transitions

    def __init__(self) -> None:
        self.spec = _checked(type(self))
        self._awaits = self.spec.awaiting()
        self._effects: list[Effect] = []
        self._fired = False
        self.published: XenbusState | None = self.INITIAL_PUBLISHED
        cls = HierarchicalMachine if self.spec.nested else Machine
        self._machine = cls(
            model=self,
            states=[self._state_dict(s) for s in self.spec.states],
            transitions=[self._transition_dict(t) for t in self.spec.transitions],
            initial=self.spec.initial,
            auto_transitions=False,
            ignore_invalid_triggers=False,
            queued=True,
            send_event=False,
            after_state_change=[self._mark_fired],
        )

    # --- building -------------------------------------------------------------------------

    def _bind(self, names: tuple[str, ...]) -> list[Callback]:
        return [getattr(self, n) for n in names]

    def _state_dict(self, s: StateSpec) -> dict[str, Any]:
        on_enter = self._bind(s.on_enter)
        if s.xenbus is not None:
            on_enter.append(self._publish_entered)
        d: dict[str, Any] = {
            "name": s.local,
            "on_enter": on_enter,
            "on_exit": self._bind(s.on_exit),
        }
        if s.children:
            d["children"] = [self._state_dict(c) for c in s.children]
            d["initial"] = self.spec.state(s.initial).local if s.initial else None
        return d

    def _transition_dict(self, t: TransitionSpec) -> dict[str, Any]:
        after = self._bind(t.after)
        if t.errno is not None:
            code, why = t.errno, t.doc

            def refuse(**_: Any) -> None:
                self._refuse(code, why)

            after.append(refuse)
        return {
            "trigger": t.trigger,
            "source": list(t.sources),
            "dest": t.dest,
            "conditions": self._bind(t.conditions),
            "unless": self._bind(t.unless),
            "before": self._bind(t.before),
            "after": after,
        }

    # --- running --------------------------------------------------------------------------

    def handle(self, event: Event) -> tuple[Effect, ...]:
        """Feed one event; return the effects to execute, in order."""
        name = event.trigger
        trig = self.spec.triggers.get(name)
        if trig is None:
            raise OurBug(self.spec.name, self.state, event, f"{self.SPEC} has no trigger {name!r}")
        before = self.state
        awaited = self._awaits.get(before)
        if awaited is not None and name not in awaited:
            raise OurBug(self.spec.name, before, event, f"an answer is awaited: {awaited}")
        self._effects = []
        self._fired = False
        try:
            self.trigger(name, event=event)  # type: ignore[attr-defined]
        except MachineError:
            if trig.errno is None:
                raise ERROR_FOR_BLAME[trig.blame](
                    self.spec.name, before, event, trig.doc) from None
        if not self._fired:
            if trig.errno is None:
                error = ERROR_FOR_BLAME[trig.blame]
                raise error(self.spec.name, before, event, "no transition's conditions held")
            self._effects = []
            self._refuse(trig.errno, f"not allowed while {before.replace('_', ' ')}")
        effects, self._effects = tuple(self._effects), []
        return effects

    def _refuse(self, code: int, why: str) -> None:
        """Answer the request with `code`; the trigger's doc names what was refused."""
        self.emit(Reply(error=code, message=why))

    def emit(self, *effects: Effect) -> None:
        self._effects.extend(effects)

    def _mark_fired(self, **_: Any) -> None:
        self._fired = True

    def _publish_entered(self, **_: Any) -> None:
        xenbus = self.spec.state(self.state).xenbus
        if xenbus is not None and xenbus != self.published:
            self.published = XenbusState(xenbus)
            self.emit(PublishState(self.published))

    def republish(self, **_: Any) -> None:
        """Publish the current state again (a resize re-announces Connected)."""
        if self.published is not None:
            self.emit(PublishState(self.published))

    @property
    def is_final(self) -> bool:
        return self.state in self.spec.final
