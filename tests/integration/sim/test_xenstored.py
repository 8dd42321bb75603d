"""Debian's real xenstored and oxenstored under xensim: start, answer, introduce, stop."""

from __future__ import annotations

import errno
import os
import queue
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import pyxs

from blktap3.sim import xensim
from blktap3.sim.xenlib import EventChannel, map_xenstore_page
from blktap3.sim.xenstored import Xenstored, XenstoredError
from tests.support import wait_until

pytestmark = pytest.mark.integration


@contextmanager
def client(daemon: Xenstored) -> Iterator[pyxs.Client]:
    c = pyxs.Client(unix_socket_path=str(daemon.socket_path))
    c.SU = True  # we are dom0's toolstack; pyxs guesses from /proc/xen (absent here)
    c.connect()
    try:
        yield c
    finally:
        c.close()


def tools(daemon: Xenstored, *argv: str) -> str:
    env = {**os.environ, **daemon.env()}
    return subprocess.run(list(argv), env=env, capture_output=True, text=True, check=True,
                          timeout=10).stdout


def next_event(monitor: pyxs.client.Monitor, timeout: float = 5.0) -> tuple[bytes, bytes]:
    event: tuple[bytes, bytes] = monitor.events.get(timeout=timeout)
    return event


def test_answers_pyxs_and_the_xenstore_tools(xenstored: Xenstored) -> None:
    with client(xenstored) as c:
        c.write(b"/sim/test", b"from-pyxs")
        assert c.read(b"/sim/test") == b"from-pyxs"
    tools(xenstored, "xenstore-write", "/sim/tool", "from-tools")
    assert tools(xenstored, "xenstore-read", "/sim/test").strip() == "from-pyxs"
    listing = tools(xenstored, "xenstore-ls", "/sim")
    assert 'test = "from-pyxs"' in listing and 'tool = "from-tools"' in listing


def test_stop_leaves_no_process_nor_socket(xenstored: Xenstored) -> None:
    pid = xenstored.pid
    assert pid is not None and Path(f"/proc/{pid}").exists()
    xenstored.stop()
    assert not Path(f"/proc/{pid}").exists()
    assert not xenstored.socket_path.exists()
    xenstored.stop()  # idempotent


def test_restart_serves_again(xenstored: Xenstored) -> None:
    first = xenstored.pid
    xenstored.restart()
    assert xenstored.pid != first
    with client(xenstored) as c:
        c.write(b"/sim/after", b"restart")
        assert c.read(b"/sim/after") == b"restart"


def test_introduced_domain_is_seen_and_its_destruction_noticed(
        xenstored: Xenstored, machine: xensim.Machine) -> None:
    guest = machine.create_domain(5, 64)
    with client(xenstored) as c, EventChannel(machine.run_dir, 5) as evt:
        evt.claim(guest.xenstore_port)
        monitor = c.monitor()
        monitor.watch(b"@introduceDomain", b"intro")
        monitor.watch(b"@releaseDomain", b"release")
        initial = {next_event(monitor)[1], next_event(monitor)[1]}
        assert initial == {b"intro", b"release"}, "a watch fires once when set"
        c.introduce_domain(guest.domid, guest.xenstore_mfn, guest.xenstore_port)
        assert next_event(monitor) == (b"@introduceDomain", b"intro")
        assert c.is_domain_introduced(guest.domid)
        machine.destroy_domain(guest.domid)
        assert next_event(monitor) == (b"@releaseDomain", b"release")
        wait_until(lambda: not c.is_domain_introduced(guest.domid), 5,
                   "xenstored to forget the destroyed domain")
        with pytest.raises(queue.Empty):
            next_event(monitor, timeout=0.2)


def test_the_daemon_maps_the_guest_xenstore_page(xenstored: Xenstored,
                                                 machine: xensim.Machine) -> None:
    """xenstored serves the guest through its page and event channel."""
    guest = machine.create_domain(6, 64)
    page = map_xenstore_page(machine.run_dir, guest.domid)
    with client(xenstored) as c, EventChannel(machine.run_dir, 6) as evt:
        evt.claim(guest.xenstore_port)
        c.introduce_domain(guest.domid, guest.xenstore_mfn, guest.xenstore_port)
        # struct xenstore_domain_interface: req[1024] rsp[1024] then req_cons,
        # req_prod, rsp_cons, rsp_prod (uint32 each). XS_GET_DOMAIN_PATH (10)
        # of its own domid is a request any guest may make.
        payload = b"6\0"
        header = b"".join(v.to_bytes(4, "little") for v in (10, 7, 0, len(payload)))
        request = header + payload
        page[0:len(request)] = request
        page[2052:2056] = len(request).to_bytes(4, "little")  # req_prod
        evt.notify(guest.xenstore_port)
        reply = b"/local/domain/6\0"
        deadline = time.monotonic() + 5
        while (int.from_bytes(page[2060:2064], "little") < 16 + len(reply)
               and time.monotonic() < deadline):
            evt.wait(0.1)
        assert int.from_bytes(page[1024:1028], "little") == 10, "a reply, not XS_ERROR"
        assert int.from_bytes(page[1028:1032], "little") == 7, "to our request id"
        assert bytes(page[1040:1040 + len(reply)]) == reply
    page.close()


def test_introduce_of_a_domain_that_does_not_exist_fails(xenstored: Xenstored) -> None:
    with client(xenstored) as c, pytest.raises(pyxs.PyXSError) as exc:
        c.introduce_domain(9, xensim.XENSTORE_PFN, 1)
    assert exc.value.args[0] in (errno.EINVAL, errno.ENOENT, errno.ESRCH)


def test_start_without_a_machine_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(XenstoredError, match=r"Machine\.init"):
        Xenstored(tmp_path / "nothing").start()


def test_a_socket_path_too_long_for_af_unix_is_refused(tmp_path: Path) -> None:
    machine = xensim.Machine(tmp_path / ("d" * 120))
    machine.init()
    try:
        with pytest.raises(XenstoredError, match="too long"):
            Xenstored(machine.run_dir).start()
    finally:
        machine.teardown()


def test_a_daemon_that_cannot_start_reports_its_log(machine: xensim.Machine,
                                                    tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    script = fake_bin / "xenstored"
    script.write_text("#!/bin/sh\necho 'cannot open the privileged interface' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(XenstoredError, match="privileged interface"):
        Xenstored(machine.run_dir, xen_bin=fake_bin).start()
