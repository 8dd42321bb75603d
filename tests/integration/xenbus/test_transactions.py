"""Real transaction conflicts between two clients are retried by `transact`."""

from __future__ import annotations

import threading

import pytest

from blktap3.sim.host import Host
from blktap3.xenbus import Access, Permission, Transaction, XenStore

from .conftest import Guest

pytestmark = pytest.mark.integration

COUNTER = "/local/domain/0/counter"


def test_a_conflicting_commit_is_rerun_and_both_updates_land(
    xs: XenStore, host: Host
) -> None:
    xs.write(COUNTER, "0")
    runs = 0

    with XenStore.open(str(host.xenstored_path), timeout=5.0) as other:

        def other_increment(tx: Transaction) -> None:
            tx.write(COUNTER, str(int(tx.read(COUNTER)) + 1))

        def increment(tx: Transaction) -> None:
            nonlocal runs
            runs += 1
            value = int(tx.read(COUNTER))
            if runs == 1:
                # Another client commits a change to the node we read, mid-transaction.
                other.transact(other_increment)
            tx.write(COUNTER, str(value + 1))

        xs.transact(increment, backoff=0.001)

    assert runs == 2, "the first commit met EAGAIN and the body ran again"
    assert xs.read(COUNTER) == "2"


def test_concurrent_incrementers_lose_no_update(host: Host, xs: XenStore) -> None:
    xs.write(COUNTER, "0")
    per_thread = 25
    errors: list[BaseException] = []

    def increment(tx: Transaction) -> None:
        tx.write(COUNTER, str(int(tx.read(COUNTER)) + 1))

    def worker() -> None:
        try:
            with XenStore.open(str(host.xenstored_path), timeout=5.0) as client:
                for _ in range(per_thread):
                    client.transact(increment, attempts=100)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert xs.read(COUNTER) == str(3 * per_thread)


def test_guest_transaction_writes_frontend_keys_with_perms(guest: Guest, xs: XenStore) -> None:
    def publish(tx: Transaction) -> None:
        tx.write(guest.vbd.frontend_key("ring-ref"), "8")
        tx.write(guest.vbd.frontend_key("event-channel"), "4",
                 perms=[Permission(guest.domid, Access.NONE), Permission(0, Access.READ)])
        tx.write(guest.vbd.frontend_key("state"), "3")

    guest.xs.transact(publish)
    assert xs.read(guest.vbd.frontend_key("state")) == "3"
    assert xs.get_perms(guest.vbd.frontend_key("event-channel")) == [
        Permission(guest.domid, Access.NONE), Permission(0, Access.READ)]
