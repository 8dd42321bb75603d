"""The watch stream survives a xenstored restart: Reconnected, then watches fire again."""

from __future__ import annotations

import pytest

from blktap3.sim.host import Host
from blktap3.xenbus import Reconnected, WatchEvent, WatchStream, XenStore

pytestmark = pytest.mark.integration

PATH = "/local/domain/0/backend/vbd3"


def test_watch_stream_reconnects_after_restart(host: Host) -> None:
    with WatchStream.open(reconnect_attempts=40) as stream:  # XENSTORED_PATH, set by fixture
        stream.watch(PATH, "backends")
        assert stream.wait(5) == WatchEvent(PATH, "backends")

        host.restart_xenstored()

        event = stream.wait(15)
        assert isinstance(event, Reconnected)
        assert stream.wait(5) == WatchEvent(PATH, "backends"), "re-registered: fires once"
        with XenStore.open(timeout=5.0) as xs:
            xs.write(f"{PATH}/5/768/state", "1")
        seen = set()
        while (event := stream.wait(2)) is not None:
            assert isinstance(event, WatchEvent)
            seen.add(event.path)
        assert f"{PATH}/5/768/state" in seen
