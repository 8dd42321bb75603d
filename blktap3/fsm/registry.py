"""Which class runs which spec: the list the checks, the diagram tool and tests walk."""

from __future__ import annotations

from .backend import BackendVbd
from .frontend import FrontendVbd
from .machine import SpecMachine
from .tapdisk import TapdiskProcess, TapdiskVbd

MACHINE_CLASSES: dict[str, type[SpecMachine]] = {
    cls.SPEC: cls for cls in (BackendVbd, FrontendVbd, TapdiskProcess, TapdiskVbd)
}
