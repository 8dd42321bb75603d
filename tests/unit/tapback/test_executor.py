"""The executor of a back-end machine's effects: what it does with each, and what it
refuses (an effect it does not know is our bug)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import structlog
from pytest_mock import MockerFixture

from blktap3.ctl.client import CtlError, TapdiskClient
from blktap3.ctl.protocol import ImageInfo
from blktap3.fsm import (
    ControlMessage,
    DiskInfo,
    DiskInfoFailed,
    DiskInfoQuery,
    DiskInfoRead,
    Effect,
    SendControl,
    TapdiskRef,
    WatchTapdisk,
)
from blktap3.tapback.executor import EffectExecutor, VbdConfig
from blktap3.tapback.store import SharedStore

from .test_worker import PATHS, FakeXenStore


def executor(watched: list[TapdiskRef] | None = None) -> EffectExecutor:
    xs = FakeXenStore()
    return EffectExecutor(PATHS, PATHS.frontend, SharedStore(lambda: xs),  # type: ignore[arg-type,return-value]
                          VbdConfig(Path("/nonexistent")), structlog.get_logger(),
                          on_watch_tapdisk=(watched if watched is not None else []).append,
                          on_writes_dropped=lambda: None)


class Mystery(Effect):
    """An effect no executor knows."""


class Riddle(ControlMessage):
    """A control message no executor knows."""


def test_an_effect_it_does_not_know_is_our_bug() -> None:
    with pytest.raises(TypeError, match="unknown back-end effect"):
        executor().execute([Mystery()])


def test_a_control_message_it_does_not_know_is_our_bug() -> None:
    with pytest.raises(TypeError, match="unknown control message"):
        executor().execute([SendControl(Riddle())])


def test_disk_info_is_asked_of_the_tapdisk_and_answered(mocker: MockerFixture) -> None:
    mocker.patch.object(TapdiskClient, "disk_info", return_value=ImageInfo(2048, 512, 4, 4096, 1))
    answers = executor().execute([SendControl(DiskInfoQuery(77, 3))])
    assert answers == [DiskInfoRead(DiskInfo(2048, 512, 4, 4096, discard=True))]
    assert TapdiskClient.disk_info.call_args.args == (3,)  # type: ignore[attr-defined]


def test_a_tapdisk_that_does_not_answer_disk_info_is_an_answer_too(
        mocker: MockerFixture) -> None:
    mocker.patch.object(TapdiskClient, "disk_info",
                        side_effect=CtlError(errno.ECONNREFUSED, "no tapdisk"))
    assert executor().execute([SendControl(DiskInfoQuery(77, 3))]) == [
        DiskInfoFailed(errno.ECONNREFUSED, "no tapdisk")]


def test_a_tapdisk_to_watch_is_passed_to_the_owner() -> None:
    watched: list[TapdiskRef] = []
    assert executor(watched).execute([WatchTapdisk(TapdiskRef(77, 3))]) == []
    assert watched == [TapdiskRef(77, 3)]
