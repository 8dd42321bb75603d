"""vbd3 paths and the strict parsers of the front-end transport keys."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blktap3.abi import BlkifProtocol
from blktap3.xenbus import (
    FrontendTransport,
    RingQueue,
    VbdPaths,
    XenbusValueError,
    backend_root,
    parse_backend_path,
    parse_frontend_transport,
)


def _parse(keys: dict[str, str], **kw: int) -> FrontendTransport:
    return parse_frontend_transport(keys.get, **kw)


def test_paths_of_a_vbd() -> None:
    vbd = VbdPaths(domid=5, devid=51712)
    assert vbd.backend == "/local/domain/0/backend/vbd3/5/51712"
    assert vbd.frontend == "/local/domain/5/device/vbd/51712"
    assert vbd.backend_key("state") == "/local/domain/0/backend/vbd3/5/51712/state"
    assert vbd.frontend_key("ring-ref") == "/local/domain/5/device/vbd/51712/ring-ref"
    assert VbdPaths(5, 768, backend_domid=3, kind="vbd").backend == (
        "/local/domain/3/backend/vbd/5/768")


def test_backend_paths_split_into_domid_devid_rest() -> None:
    root = backend_root()
    assert parse_backend_path(f"{root}/5/768/state", root) == (5, 768, "state")
    assert parse_backend_path(f"{root}/5/768", root) == (5, 768, "")
    assert parse_backend_path(f"{root}/5/768/a/b", root) == (5, 768, "a/b")
    for bad in [root, f"{root}/5", f"{root}/x/768", f"{root}/05/768", f"{root}/5/-1",
                "/local/domain/0/backend/vbd/5/768", f"{root}/99999/1"]:
        assert parse_backend_path(bad, root) is None, bad


def test_single_page_ring_with_defaults() -> None:
    transport = _parse({"ring-ref": "8", "event-channel": "11"})
    assert transport == FrontendTransport(
        ring_page_order=0, queues=(RingQueue((8,), 11),), protocol=BlkifProtocol.NATIVE,
        feature_persistent=False, multi_queue=False)
    assert transport.nr_ring_pages == 1


def test_multi_page_ring_reads_numbered_refs() -> None:
    keys = {"ring-page-order": "2", "ring-ref0": "10", "ring-ref1": "11", "ring-ref2": "12",
            "ring-ref3": "13", "event-channel": "4", "protocol": "x86_32-abi",
            "feature-persistent": "1"}
    transport = _parse(keys)
    assert transport.queues == (RingQueue((10, 11, 12, 13), 4),)
    assert transport.protocol is BlkifProtocol.X86_32
    assert transport.feature_persistent


def test_multi_queue_reads_per_queue_directories() -> None:
    keys = {"multi-queue-num-queues": "2", "ring-page-order": "1",
            "queue-0/ring-ref0": "20", "queue-0/ring-ref1": "21", "queue-0/event-channel": "5",
            "queue-1/ring-ref0": "22", "queue-1/ring-ref1": "23", "queue-1/event-channel": "6",
            "protocol": "x86_64-abi"}
    transport = _parse(keys, max_queues=4)
    assert transport.multi_queue
    assert transport.queues == (RingQueue((20, 21), 5), RingQueue((22, 23), 6))


@pytest.mark.parametrize(
    ("keys", "bad_key"),
    [
        ({"event-channel": "3"}, "ring-ref"),
        ({"ring-ref": "8"}, "event-channel"),
        ({"ring-ref": "8", "event-channel": "0"}, "event-channel"),
        ({"ring-ref": "8 ", "event-channel": "3"}, "ring-ref"),
        ({"ring-ref": "4294967296", "event-channel": "3"}, "ring-ref"),
        ({"ring-ref": "8", "event-channel": "3", "protocol": "x86_65-abi"}, "protocol"),
        ({"ring-ref": "8", "event-channel": "3", "protocol": ""}, "protocol"),
        ({"ring-ref": "8", "event-channel": "3", "feature-persistent": "yes"},
         "feature-persistent"),
        ({"ring-page-order": "5", "ring-ref0": "1", "event-channel": "3"}, "ring-page-order"),
        ({"ring-page-order": "1", "ring-ref0": "1", "event-channel": "3"}, "ring-ref1"),
        ({"ring-page-order": "0", "ring-ref": "1", "event-channel": "3"}, "ring-ref0"),
        ({"multi-queue-num-queues": "2", "ring-ref": "1", "event-channel": "3"},
         "multi-queue-num-queues"),
        ({"multi-queue-num-queues": "0", "ring-ref": "1", "event-channel": "3"},
         "multi-queue-num-queues"),
        ({"multi-queue-num-queues": "1", "ring-ref": "1", "event-channel": "3"},
         "queue-0/ring-ref"),
    ],
)
def test_bad_keys_raise_naming_key_and_value(keys: dict[str, str], bad_key: str) -> None:
    with pytest.raises(XenbusValueError) as info:
        _parse(keys)
    assert info.value.key == bad_key
    assert info.value.value == keys.get(bad_key)
    assert bad_key in str(info.value)


_KEYS = ["ring-ref", "ring-ref0", "ring-ref1", "event-channel", "ring-page-order", "protocol",
         "feature-persistent", "multi-queue-num-queues", "queue-0/ring-ref",
         "queue-0/event-channel", "queue-1/ring-ref", "queue-1/event-channel"]
_VALUES = st.one_of(st.sampled_from(["0", "1", "2", "3", "x86_64-abi", "4294967295"]),
                    st.text(max_size=12))


@given(st.dictionaries(st.sampled_from(_KEYS), _VALUES))
def test_hostile_key_sets_parse_or_raise_the_typed_error(keys: dict[str, str]) -> None:
    try:
        transport = _parse(keys, max_queues=2)
    except XenbusValueError as e:
        assert re.fullmatch(r"(queue-[01]/)?(ring-ref\d?|event-channel)|" + "|".join(_KEYS),
                            e.key), e.key
        assert e.value == keys.get(e.key)
        return
    for queue in transport.queues:
        assert len(queue.ring_refs) == transport.nr_ring_pages
        assert queue.event_channel >= 1
