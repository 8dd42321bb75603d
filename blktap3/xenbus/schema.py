"""Where a vbd3 device lives in XenStore, its key names, and the front-end key parsers.

Layout (libxl with `backendtype=tap`, xen/io/blkif.h):

- back-end directory `/local/domain/<backend-domid>/backend/vbd3/<domid>/<devid>`, owned
  by the back-end domain, readable by the guest;
- front-end directory `/local/domain/<domid>/device/vbd/<devid>`, owned by the guest,
  readable by the back-end.

The back-end reads the front-end's transport keys, which the guest wrote: they are
parsed strictly here (`parse_frontend_transport`), and any bad value raises
`XenbusValueError` naming the key and the value.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from blktap3.abi import MAX_RING_PAGE_ORDER, BlkifProtocol

from .errors import XenbusValueError
from .states import parse_decimal

DEFAULT_BACKEND_KIND = "vbd3"
FRONTEND_KIND = "vbd"
DOMID_MAX = 0x7FEF  # DOMID_FIRST_RESERVED - 1 (xen.h): real domains are below it
GRANT_REF_MAX = 0xFFFFFFFF  # grant_ref_t is uint32_t
PORT_MAX = (1 << 17) - 1  # FIFO event channels: at most 2^17 ports per domain
DEFAULT_MAX_RING_PAGE_ORDER = MAX_RING_PAGE_ORDER  # blkback's and QEMU's (blktap's: 3)
DEFAULT_MAX_QUEUES = 1


class BackendKey(enum.StrEnum):
    """Keys of the back-end directory (written by the toolstack, hotplug or tapback)."""

    FRONTEND = "frontend"
    FRONTEND_ID = "frontend-id"
    ONLINE = "online"
    PARAMS = "params"
    MODE = "mode"
    TYPE = "type"
    DEVICE_TYPE = "device-type"
    STATE = "state"
    HOTPLUG_STATUS = "hotplug-status"
    PHYSICAL_DEVICE = "physical-device"
    PHYSICAL_DEVICE_PATH = "physical-device-path"
    MAX_RING_PAGE_ORDER = "max-ring-page-order"
    MAX_RING_PAGES = "max-ring-pages"  # legacy (FreeBSD blkfront): 2^max-ring-page-order
    MULTI_QUEUE_MAX_QUEUES = "multi-queue-max-queues"
    FEATURE_MAX_INDIRECT_SEGMENTS = "feature-max-indirect-segments"
    FEATURE_BARRIER = "feature-barrier"
    FEATURE_FLUSH_CACHE = "feature-flush-cache"
    FEATURE_DISCARD = "feature-discard"
    DISCARD_GRANULARITY = "discard-granularity"
    DISCARD_ALIGNMENT = "discard-alignment"
    DISCARD_SECURE = "discard-secure"
    FEATURE_PERSISTENT = "feature-persistent"
    SECTORS = "sectors"
    INFO = "info"
    SECTOR_SIZE = "sector-size"
    PHYSICAL_SECTOR_SIZE = "physical-sector-size"
    ERROR = "error"


class FrontendKey(enum.StrEnum):
    """Keys of the front-end directory (written by the toolstack, then by the guest)."""

    BACKEND = "backend"
    BACKEND_ID = "backend-id"
    VIRTUAL_DEVICE = "virtual-device"
    DEVICE_TYPE = "device-type"
    STATE = "state"
    RING_REF = "ring-ref"
    RING_PAGE_ORDER = "ring-page-order"
    EVENT_CHANNEL = "event-channel"
    PROTOCOL = "protocol"
    FEATURE_PERSISTENT = "feature-persistent"
    MULTI_QUEUE_NUM_QUEUES = "multi-queue-num-queues"


def ring_ref_key(index: int) -> str:
    """`ring-ref<N>`, the key of page N of a multi-page ring."""
    return f"{FrontendKey.RING_REF}{index}"


def queue_dir(index: int) -> str:
    """`queue-<N>`, the sub-directory of queue N when multi-queue is used."""
    return f"queue-{index}"


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def backend_root(backend_domid: int = 0, kind: str = DEFAULT_BACKEND_KIND) -> str:
    """`/local/domain/<backend-domid>/backend/<kind>`: the directory tapback watches."""
    return f"{domain_path(backend_domid)}/backend/{kind}"


@dataclass(frozen=True, slots=True)
class VbdPaths:
    """The two directories of one virtual block device and its keys' full paths."""

    domid: int
    devid: int
    backend_domid: int = 0
    kind: str = DEFAULT_BACKEND_KIND

    @property
    def backend(self) -> str:
        return f"{backend_root(self.backend_domid, self.kind)}/{self.domid}/{self.devid}"

    @property
    def frontend(self) -> str:
        return f"{domain_path(self.domid)}/device/{FRONTEND_KIND}/{self.devid}"

    def backend_key(self, key: str) -> str:
        return f"{self.backend}/{key}"

    def frontend_key(self, key: str) -> str:
        return f"{self.frontend}/{key}"


_BACKEND_REL = re.compile(r"\A(0|[1-9][0-9]{0,4})/(0|[1-9][0-9]{0,9})(?:/(.*))?\Z")


def parse_backend_path(path: str, root: str) -> tuple[int, int, str] | None:
    """Split a path below `root` into (domid, devid, rest), e.g. from a watch event.

    Returns None for a path that is not inside a device directory (the root itself, a
    per-domain directory, or a malformed name somebody created there).
    """
    prefix = root.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    match = _BACKEND_REL.match(path[len(prefix):])
    if match is None:
        return None
    domid, devid = int(match.group(1)), int(match.group(2))
    if domid > DOMID_MAX or devid > 0xFFFFFFFF:
        return None
    return domid, devid, match.group(3) or ""


@dataclass(frozen=True, slots=True)
class RingQueue:
    """One blkif ring: its granted pages and its event channel."""

    ring_refs: tuple[int, ...]
    event_channel: int


@dataclass(frozen=True, slots=True)
class FrontendTransport:
    """What a front-end published for the back-end to connect its ring(s)."""

    ring_page_order: int
    queues: tuple[RingQueue, ...]
    protocol: BlkifProtocol
    feature_persistent: bool
    multi_queue: bool

    @property
    def nr_ring_pages(self) -> int:
        return 1 << self.ring_page_order


Reader = Callable[[str], str | None]


class _ReadsOptional(Protocol):
    def read_optional(self, path: str) -> str | None: ...


def reader_for(ops: _ReadsOptional, directory: str) -> Reader:
    """A `Reader` of keys below `directory` through a `XenStore` or a `Transaction`."""
    return lambda key: ops.read_optional(f"{directory}/{key}")


def parse_protocol(value: str | None) -> BlkifProtocol:
    """`protocol`: missing means the back-end's native layout (blkif.h)."""
    layout = BlkifProtocol.from_xenstore(value)
    if layout is None:
        raise XenbusValueError(FrontendKey.PROTOCOL, value, "unknown protocol")
    return layout


def parse_bool(value: str | None, key: str, default: bool = False) -> bool:
    """A `feature-*` flag: "0" or "1" (missing: `default`)."""
    if value is None:
        return default
    if value not in ("0", "1"):
        raise XenbusValueError(key, value, 'expected "0" or "1"')
    return value == "1"


def _parse_queue(read: Reader, prefix: str, order: int, explicit_order: bool) -> RingQueue:
    if explicit_order:
        refs = tuple(
            parse_decimal(read(prefix + ring_ref_key(i)), prefix + ring_ref_key(i),
                          hi=GRANT_REF_MAX)
            for i in range(1 << order)
        )
    else:
        key = prefix + FrontendKey.RING_REF
        refs = (parse_decimal(read(key), key, hi=GRANT_REF_MAX),)
    key = prefix + FrontendKey.EVENT_CHANNEL
    port = parse_decimal(read(key), key, lo=1, hi=PORT_MAX)  # port 0 is never bound
    return RingQueue(refs, port)


def parse_frontend_transport(
    read: Reader,
    *,
    max_ring_page_order: int = DEFAULT_MAX_RING_PAGE_ORDER,
    max_queues: int = DEFAULT_MAX_QUEUES,
) -> FrontendTransport:
    """Parse the transport keys of a front-end directory, as Linux blkback reads them.

    `read(key)` returns the value of a key relative to the front-end directory (e.g.
    `queue-0/ring-ref`), or None when it is missing. Without `ring-page-order` the ring
    is one page in `ring-ref`; with it, `2**order` pages in `ring-ref0..N-1`. With
    `multi-queue-num-queues` each queue's keys are in `queue-N/`.
    """
    raw_order = read(FrontendKey.RING_PAGE_ORDER)
    explicit_order = raw_order is not None
    order = 0
    if explicit_order:
        order = parse_decimal(raw_order, FrontendKey.RING_PAGE_ORDER, hi=max_ring_page_order)

    raw_queues = read(FrontendKey.MULTI_QUEUE_NUM_QUEUES)
    multi_queue = raw_queues is not None
    if multi_queue:
        nr_queues = parse_decimal(raw_queues, FrontendKey.MULTI_QUEUE_NUM_QUEUES,
                                  lo=1, hi=max_queues)
        queues = tuple(
            _parse_queue(read, queue_dir(i) + "/", order, explicit_order)
            for i in range(nr_queues)
        )
    else:
        queues = (_parse_queue(read, "", order, explicit_order),)

    return FrontendTransport(
        ring_page_order=order,
        queues=queues,
        protocol=parse_protocol(read(FrontendKey.PROTOCOL)),
        feature_persistent=parse_bool(read(FrontendKey.FEATURE_PERSISTENT),
                                      FrontendKey.FEATURE_PERSISTENT),
        multi_queue=multi_queue,
    )
