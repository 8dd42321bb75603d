"""A simulated guest domain: a process whose blkfront runs the handshake and verified I/O.

    parent.py    the guest seen from outside (what `blktap3-sim guest run`, the demo and
                 the tests call): `run_guest`, `start_guest`, `GuestProcess`, `GuestResult`
    child.py     the guest process itself (`python -m blktap3.sim.guest`): `GuestOptions`
                 from its command line, and its life (handshake, workload, hold, detach)
    workload.py  what it does on the ring, and the typed figures of each phase
    report.py    what the child hands the parent: `GuestReport`, its JSON line, the exit
                 codes, the human summary

The blkfront itself is `blktap3.sim.frontend`, its ring driver `blktap3.sim.guestdrv`.
"""

from .parent import GuestProcess, GuestResult, guest_command, guest_env, run_guest, start_guest
from .report import EXIT_FAILED, EXIT_OK, EXIT_USAGE, GuestReport, format_report
from .workload import WORKLOADS

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "WORKLOADS",
    "GuestProcess",
    "GuestReport",
    "GuestResult",
    "format_report",
    "guest_command",
    "guest_env",
    "run_guest",
    "start_guest",
]
