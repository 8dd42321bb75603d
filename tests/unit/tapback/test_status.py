"""tapback's status file: the live state of every VBD, for the diagram tool."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from blktap3.tapback.status import StatusFile, VbdStatus, default_path


def read(path: Path) -> object:
    return json.loads(path.read_text())


def test_default_path_is_in_the_control_dir_per_backend_kind() -> None:
    assert default_path(Path("/run/blktap-control"), "vbd3") == Path(
        "/run/blktap-control/tapback.vbd3.status.json")


def test_content_follows_the_contract(tmp_path: Path) -> None:
    status = StatusFile(tmp_path / "sub" / "s.json", pid=1234)
    status.start()
    assert read(status.path) == {"pid": 1234, "vbds": []}
    status.update((2, 768), VbdStatus("backend_vbd", "init_wait", 2))
    status.update((1, 51712), VbdStatus("backend_vbd", "connected", 4))
    status.update((1, 51713), VbdStatus("backend_vbd", "waiting_hotplug", None))
    assert read(status.path) == {"pid": 1234, "vbds": [
        {"domid": 1, "devid": 51712, "machine": "backend_vbd", "state": "connected",
         "published": 4},
        {"domid": 1, "devid": 51713, "machine": "backend_vbd", "state": "waiting_hotplug",
         "published": None},
        {"domid": 2, "devid": 768, "machine": "backend_vbd", "state": "init_wait",
         "published": 2},
    ]}
    status.forget((1, 51713))
    status.forget((2, 768))
    assert [v["devid"] for v in read(status.path)["vbds"]] == [51712]  # type: ignore[index]
    status.remove()
    assert not status.path.exists()
    assert os.listdir(status.path.parent) == []  # no temporary file left behind


def test_it_is_replaced_whole_and_only_when_something_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    status = StatusFile(tmp_path / "s.json", pid=1)
    status.start()
    replaced: list[str] = []
    real = os.replace

    def replace(src: str, dst: Path) -> None:
        assert Path(src).parent == tmp_path  # written beside it, then renamed over it
        replaced.append(dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    status.update((1, 2), VbdStatus("backend_vbd", "connected", 4))
    status.update((1, 2), VbdStatus("backend_vbd", "connected", 4))
    status.forget((3, 4))
    assert replaced == [status.path]


def test_a_status_file_that_cannot_be_written_does_not_stop_tapback(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")  # not a directory, even for root
    status = StatusFile(tmp_path / "file" / "s.json", pid=1)
    with capture_logs() as logs:
        status.start()
        status.update((1, 2), VbdStatus("backend_vbd", "connected", 4))
    assert [e["event"] for e in logs] == ["status file not written"]  # said once
