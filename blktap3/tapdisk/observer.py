"""Control requests -> events of the VBD machine: the one translation, with no I/O.

`observe(message)` says what a decoded control message means for the VBDs of a tapdisk:
which minor's machine (`blktap3.fsm.tapdisk.TapdiskVbd`) gets which event (`ToVbd`), or
an argument refused before any machine is asked (`BadArgument`: open/resume flags naming
blktap features we do not have), or nothing (`None`: not a VBD request - PID, LIST,
LIST_MINORS, STATS and EXIT are the tapdisk's own, and a reply is no request).  It
decides no protocol rule: whether the VBD takes the event, and what it answers, is the
spec's (specs/tapdisk_vbd.toml).  The control server (`tapdisk.control`) feeds what this
returns into the machines; so do the tests and the conformance harness, so none of them
can translate a request differently.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from blktap3.ctl import protocol as p
from blktap3.fsm import events as ev

from . import images

T = p.MessageType


@dataclass(frozen=True)
class ToVbd:
    """Feed `event` to the machine of the VBD `minor`."""

    minor: int
    event: ev.Event


@dataclass(frozen=True)
class BadArgument:
    """Refused before any machine is asked (after the lookup of `minor`)."""

    minor: int
    errno: int
    reason: str


Observation = ToVbd | BadArgument


def _flags_refused(minor: int, flags: int) -> BadArgument | None:
    try:
        images.check_flags(flags)
    except OSError as exc:
        return BadArgument(minor, exc.errno or errno.EINVAL, str(exc.strerror))
    return None


def observe(message: p.Message, logpath: str = "") -> Observation | None:
    """The event a control message is for one VBD, or None when it is for no VBD.
    `logpath`: what followed an OPEN/RESUME with ADD_LOG."""
    minor, payload = message.cookie, message.payload
    match message.type:
        case T.ATTACH:
            return ToVbd(minor, ev.Attach())
        case T.OPEN:
            assert isinstance(payload, p.Params)  # the codec's payload class of OPEN
            return (_flags_refused(minor, payload.flags)
                    or ToVbd(minor, ev.Open(
                        payload.path, payload.flags, logpath=logpath,
                        secondary=payload.secondary if payload.flags & p.OpenFlags.SECONDARY
                        else "")))
        case T.RESUME:
            assert isinstance(payload, p.Resume)
            resize = bool(payload.flags & p.ResumeFlags.RESIZE)
            return (_flags_refused(minor, payload.flags)
                    or ToVbd(minor, ev.Resume(
                        payload.new_params or None, resize=resize,
                        logpath=logpath if payload.flags & p.OpenFlags.ADD_LOG else None,
                        secondary=payload.secondary if payload.flags & p.OpenFlags.SECONDARY
                        else None)))
        case T.PAUSE:
            return ToVbd(minor, ev.Pause())
        case T.CLOSE:
            return ToVbd(minor, ev.Close())
        case T.FORCE_SHUTDOWN:
            return ToVbd(minor, ev.Close(force=True))
        case T.DETACH:
            return ToVbd(minor, ev.Detach())
        case T.XENBLKIF_CONNECT:
            assert isinstance(payload, p.Blkif)
            ring = ev.BlkifRing(
                payload.domid, payload.devid, grefs=tuple(payload.grefs), order=payload.order,
                port=payload.port, protocol=payload.proto, poll_us=payload.poll_duration,
                poll_idle_threshold=payload.poll_idle_threshold,
                max_indirect_segments=payload.max_indirect_segments,
                discard=not payload.flags & p.BlkifFlags.NO_DISCARD,
                persistent=bool(payload.flags & p.BlkifFlags.PERSISTENT),
                queue=payload.queue, nr_queues=payload.queues,
            )
            return ToVbd(minor, ev.ConnectRing(ring))
        case T.XENBLKIF_DISCONNECT:
            assert isinstance(payload, p.Blkif)
            return ToVbd(minor, ev.DisconnectRing(payload.domid, payload.devid))
        case T.DISK_INFO:
            return ToVbd(minor, ev.GetDiskInfo())
        case _:
            return None
