"""blktap's stats JSON spelling, and the VBD's states and state bits from the spec."""

from __future__ import annotations

import json

import pytest

from blktap3.fsm import events
from blktap3.fsm.tapdisk import VbdState
from blktap3.tapdisk import stats
from blktap3.tapdisk.vbd import Vbd


def test_render_spells_json_as_blktap() -> None:
    assert stats.render({"a": [0, 0], "b": [], "c": {"d": "x"}, "e": None}) == (
        '{ "a": [ 0, 0 ], "b": [  ], "c": { "d": "x" }, "e": null }'
    )
    with pytest.raises(TypeError):
        stats.render(object())


def test_unconnected_vbd_stats_match_blktaps_sample() -> None:
    body = stats.vbd_stats(params="aio:/p", image_type="aio", image_path="/p",
                           ring_stats=None, ring_ids=None)
    assert stats.render_stats(body) == (
        '{ "name": "aio:/p", "secs": [ 0, 0 ], "images": [ { "name": "/p", "hits": [ 0, 0 ], '
        '"fail": [ 0, 0 ], "driver": { "type": 0, "name": "aio", "status": { "reqs": '
        '{ "max": 0, "pending": 0 } } } } ], "FIXME_enospc_redirect_count": 0, '
        '"nbd_mirror_failed": 0, "reqs_outstanding": 0, "read_caching": "false" }'
    )  # no newline: blktap's tap-ctl adds its own two (control/tap-ctl-stats.c:161)


def test_connected_vbd_stats_carry_the_ring_counters() -> None:
    ring = {"reqs": {"read": 5, "write": 2, "flush": 1}, "sectors": {"read": 40, "written": 16},
            "kicks": {"in": 7, "out": 6}, "responses": 8, "in_flight": 1, "slots": 32,
            "errors": {"grant": 1, "range": 2, "io": 3}, "halted": "req_prod overflow"}
    body = json.loads(stats.render_stats(stats.vbd_stats(
        params="aio:/p", image_type="aio", image_path="/p", ring_stats=ring,
        ring_ids=(3, 51712))))
    assert body["secs"] == [40, 16]
    assert body["images"][0]["hits"] == [5, 2]
    assert body["xenbus"] == {
        "pool": "td-xenio-default", "domid": 3, "devid": 51712, "reqs": [8, 8],
        "kicks": [7, 6], "errors": {"msg": 0, "map": 1, "vbd": 2, "img": 3},
        "halted": "req_prod overflow",
    }
    assert body["reqs_outstanding"] == 1


def test_indirect_requests_count_as_reads_and_writes_and_their_errors_are_sorted() -> None:
    ring = {"reqs": {"read": 5, "write": 2, "indirect": 9},
            "indirect": {"read": 4, "write": 3, "pages": 7},
            "responses": 16, "errors": {"grant": 1, "indirect_grant": 2, "indirect_op": 1,
                                        "indirect_segments": 1, "sector": 1}}
    body = json.loads(stats.render_stats(stats.vbd_stats(
        params="aio:/p", image_type="aio", image_path="/p", ring_stats=ring,
        ring_ids=(3, 51712))))
    assert body["images"][0]["hits"] == [5 + 4, 2 + 3]
    assert body["xenbus"]["reqs"] == [16, 16]
    assert body["xenbus"]["errors"] == {"msg": 0, "map": 3, "vbd": 3, "img": 0}


def test_the_vbd_reads_state_bits_and_params_off_the_machine() -> None:
    vbd = Vbd(0, -1)
    assert vbd.state is VbdState.ALLOCATED
    vbd.machine.handle(events.Attach())
    vbd.machine.handle(events.Open("aio:/p"))
    assert (vbd.state, vbd.params) == (VbdState.OPENING, "")
    vbd.machine.handle(events.ImageOpened(events.DiskInfo(8)))
    assert (vbd.state, vbd.bits, vbd.params) == (VbdState.OPEN_READY, 0, "aio:/p")
    vbd.machine.handle(events.Pause())
    assert (vbd.state, vbd.bits) == (VbdState.OPEN_QUIESCING, 0x14)
    vbd.machine.handle(events.Drained())
    assert (vbd.state, vbd.bits, vbd.params) == (VbdState.OPEN_PAUSED, 0x2A, "aio:/p")
    vbd.machine.handle(events.Close())
    assert (vbd.state, vbd.bits, vbd.params) == (VbdState.CLOSED, 0x2, "")
