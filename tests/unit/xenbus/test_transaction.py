"""The transaction helper: the body re-runs on EAGAIN, bounded, and aborts on errors."""

from __future__ import annotations

import pytest

from blktap3.xenbus import (
    Transaction,
    XenStore,
    XenStoreAgain,
    XenStoreTransactionConflict,
)

from .fakexs import TX_END, TX_START, WRITE, FakeXenstored


def _ends(fake: FakeXenstored) -> list[bytes]:
    return [payload for op, _tx, payload in fake.store.requests if op == TX_END]


def test_commit_conflicts_rerun_the_whole_body(
    client: XenStore, fake_xenstored: FakeXenstored
) -> None:
    fake_xenstored.store.eagain_commits = 3
    runs: list[int] = []

    def body(tx: Transaction) -> str:
        runs.append(tx.tx_id)
        tx.write("/dev/ring-ref", "8")
        tx.write("/dev/event-channel", str(len(runs)))
        return "done"

    assert client.transact(body, backoff=0.001) == "done"
    assert len(runs) == 4
    assert len(set(runs)) == 4, "each attempt is a new transaction"
    assert client.read("/dev/event-channel") == "4"
    # Writes carried their transaction's id, not 0.
    write_txs = {tx for op, tx, _p in fake_xenstored.store.requests if op == WRITE}
    assert write_txs == set(runs)
    assert _ends(fake_xenstored) == [b"T\0"] * 4


def test_conflicts_past_the_bound_raise(client: XenStore, fake_xenstored: FakeXenstored) -> None:
    fake_xenstored.store.eagain_commits = 100
    calls = 0

    def body(tx: Transaction) -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(XenStoreTransactionConflict) as info:
        client.transact(body, attempts=5, backoff=0.001)
    assert calls == 5
    assert isinstance(info.value, XenStoreAgain)
    assert info.value.errno == 11


def test_eagain_inside_the_body_aborts_and_retries(
    client: XenStore, fake_xenstored: FakeXenstored
) -> None:
    calls = 0

    def body(tx: Transaction) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise XenStoreAgain(11)
        return calls

    assert client.transact(body, backoff=0.001) == 2
    assert _ends(fake_xenstored) == [b"F\0", b"T\0"]


def test_other_errors_abort_and_propagate(client: XenStore, fake_xenstored: FakeXenstored) -> None:
    def body(tx: Transaction) -> None:
        tx.write("/x", "1")
        raise KeyError("bug in body")

    with pytest.raises(KeyError):
        client.transact(body)
    assert _ends(fake_xenstored) == [b"F\0"]
    starts = [op for op, _tx, _p in fake_xenstored.store.requests if op == TX_START]
    assert len(starts) == 1


def test_an_ended_transaction_cannot_be_used(client: XenStore) -> None:
    tx = client.transaction()
    assert tx.commit()
    with pytest.raises(ValueError, match="already ended"):
        tx.read("/")
