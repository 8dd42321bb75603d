"""A VBD's statistics in blktap's JSON text, spacing included (`{ "k": [ 0, 0 ] }`).

blktap's tapdisk writes JSON with its own printer: a space inside every bracket, `, `
between items, an empty list as `[  ]`, no newline at the end, and a VBD without an image
named `"(null)"` (printf of a NULL name). Scripts that scrape `tap-ctl stats` see the same
text from us. The counters come from the data path's `Ring.stats()`, summed over the
queues of a multi-queue front-end (`queues.Queues`); with more than one queue, the
`xenbus` object also lists each queue's requests and kicks under "queues" (ours).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

# blktap driver type ids (DISK_TYPE_*): aio 0; ours beyond it get their own.
DRIVER_TYPE_IDS = {"aio": 0, "raw": 0, "null": 100}
# The data path's error causes, sorted into blktap's four error counters.
_VBD_ERRORS = ("op", "segments", "sector", "range", "readonly", "unsupported", "overflow",
               "indirect_op", "indirect_segments")
_MAP_ERRORS = ("grant", "indirect_grant")


def render(value: Any) -> str:
    """blktap's JSON spelling of a value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(k)}: {render(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[ " + ", ".join(render(v) for v in value) + " ]"
    raise TypeError(f"cannot render {type(value).__name__}")


def _get(stats: Mapping[str, Any], *keys: str) -> int:
    """A nested counter of `Ring.stats()` (0 when absent)."""
    value: Any = stats
    for key in keys:
        if not isinstance(value, Mapping):
            return 0
        value = value.get(key, 0)
    return int(value) if isinstance(value, int | float) else 0


def _ring_traffic(counters: Mapping[str, Any]) -> dict[str, Any]:
    """blktap's `reqs [in, out]` and `kicks [in, out]` of a ring (or of one queue)."""
    reqs = counters.get("reqs", {})
    total = sum(_get(counters, "reqs", op) for op in reqs) if isinstance(reqs, Mapping) else 0
    return {"reqs": [total, _get(counters, "responses")],
            "kicks": [_get(counters, "kicks", "in"), _get(counters, "kicks", "out")]}


def vbd_stats(
    *,
    params: str,
    image_type: str | None,
    image_path: str | None,
    ring_stats: Mapping[str, Any] | None,
    ring_ids: tuple[int, int] | None,
    mirror: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The STATS object of one VBD; paused or closed VBDs list no image, as blktap's.
    `mirror`: the secondary's counters (`Image.mirror_stats`), shown as blktap's
    `nbd_mirror_failed` (secondaries dropped on failure) plus our `mirror` object."""
    counters: Mapping[str, Any] = ring_stats or {}
    # Reads and writes, direct or inside an indirect request.
    reads = _get(counters, "reqs", "read") + _get(counters, "indirect", "read")
    writes = _get(counters, "reqs", "write") + _get(counters, "indirect", "write")
    io_errors = _get(counters, "errors", "io")
    images: list[dict[str, Any]] = []
    if image_type is not None and image_path is not None:
        images.append({
            "name": image_path,
            "hits": [reads, writes],
            "fail": [io_errors, 0],
            "driver": {
                "type": DRIVER_TYPE_IDS.get(image_type, 0),
                "name": image_type,
                "status": {"reqs": {
                    "max": _get(counters, "slots"),
                    "pending": _get(counters, "in_flight"),
                }},
            },
        })
    result: dict[str, Any] = {
        "name": params or "(null)",
        "secs": [_get(counters, "sectors", "read"), _get(counters, "sectors", "written")],
        "images": images,
        "FIXME_enospc_redirect_count": 0,
        "nbd_mirror_failed": _get(mirror or {}, "failed"),
    }
    if mirror is not None and mirror.get("kind"):
        result["mirror"] = dict(mirror)
    if ring_stats is not None and ring_ids is not None:
        xenbus: dict[str, Any] = {
            "pool": "td-xenio-default",
            "domid": ring_ids[0],
            "devid": ring_ids[1],
            **_ring_traffic(counters),
            "errors": {
                "msg": 0,
                "map": sum(_get(counters, "errors", cause) for cause in _MAP_ERRORS),
                "vbd": sum(_get(counters, "errors", cause) for cause in _VBD_ERRORS),
                "img": io_errors,
            },
        }
        if isinstance(counters.get("persistent"), Mapping):
            # Ours, beside blktap's keys: persistent grants negotiated and their cache.
            xenbus["persistent"] = dict(counters["persistent"])
        if isinstance(counters.get("polling"), Mapping):
            # Ours too: spins before sleeping (polling-duration), spins skipped because
            # less CPU was idle than polling-idle-threshold, and that threshold.
            xenbus["polling"] = dict(counters["polling"])
        if counters.get("halted"):
            xenbus["halted"] = str(counters["halted"])
        queues = counters.get("queues") or ()
        if len(queues) > 1:  # multi-queue (ours): each queue's share of the sums above
            xenbus["queues"] = [_ring_traffic(queue) for queue in queues]
        result["xenbus"] = xenbus
    result["reqs_outstanding"] = _get(counters, "in_flight")
    result["read_caching"] = "false"
    return result


def render_stats(stats: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """The text sent after the STATS_RSP header: one VBD's object, or the array of every
    VBD's (STATS for all VBDs, drivers/tapdisk-control.c), with no newline."""
    return render(stats)
