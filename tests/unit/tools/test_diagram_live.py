"""`blktap3-diagram --live`: a running tapback's status file names each VBD's state.

The files are written here in the contract's shape (tapback writes the real ones):
{"pid": <tapback pid>, "vbds": [{"domid", "devid", "machine", "state", "published"}]}.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from blktap3.tools import diagram


def status(path: Path, pid: int | None = None, **vbd: Any) -> Path:
    entry = {"domid": 1, "devid": 51712, "machine": "backend_vbd", "state": "connected",
             "published": 4, **vbd}
    other = {"domid": 2, "devid": 768, "machine": "backend_vbd", "state": "init_wait",
             "published": 2}
    path.write_text(json.dumps({"pid": os.getpid() if pid is None else pid,
                                "vbds": [other, entry]}))
    return path


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: nothing has this pid until the kernel reuses it
    return child.pid


def test_live_state_reads_the_vbd_s_state(tmp_path: Path) -> None:
    file = status(tmp_path / "s.json")
    assert diagram.live_state(file, 1, 51712) == "connected"
    assert diagram.live_state(file, 2, 768) == "init_wait"
    vbd = diagram.read_live(file, 1, 51712)
    assert (vbd.machine, vbd.published, vbd.pid) == ("backend_vbd", 4, os.getpid())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not a tapback status file"),
        ("[1, 2]", 'expected {"pid": <int>, "vbds": [...]}'),
        (json.dumps({"vbds": []}), 'expected {"pid"'),
        (json.dumps({"pid": "12", "vbds": []}), 'expected {"pid"'),
        (json.dumps({"pid": os.getpid(), "vbds": {}}), 'expected {"pid"'),
        (json.dumps({"pid": os.getpid(), "vbds": []}), "has no VBD 1/51712 (it has: none)"),
    ],
)
def test_a_malformed_status_file_is_a_clear_error(
    tmp_path: Path, content: str, message: str
) -> None:
    file = tmp_path / "s.json"
    file.write_text(content)
    with pytest.raises(diagram.DiagramError) as info:
        diagram.live_state(file, 1, 51712)
    assert message in str(info.value)


def test_a_missing_file_a_dead_tapback_and_an_unknown_vbd_are_clear_errors(
    tmp_path: Path,
) -> None:
    with pytest.raises(diagram.DiagramError, match="no tapback status file"):
        diagram.live_state(tmp_path / "absent.json", 1, 51712)
    stale = status(tmp_path / "stale.json", pid=dead_pid())
    with pytest.raises(diagram.DiagramError, match="is not running: the status is stale"):
        diagram.live_state(stale, 1, 51712)
    with pytest.raises(diagram.DiagramError, match=r"no VBD 3/5 \(it has: 1/51712, 2/768\)"):
        diagram.live_state(status(tmp_path / "s.json"), 3, 5)


def test_a_state_or_machine_the_specs_do_not_know_is_refused(tmp_path: Path) -> None:
    with pytest.raises(diagram.DiagramError, match="'dancing', not a state of backend_vbd"):
        diagram.live_state(status(tmp_path / "a.json", state="dancing"), 1, 51712)
    with pytest.raises(diagram.DiagramError, match="unknown machine 'toaster'"):
        diagram.live_state(status(tmp_path / "b.json", machine="toaster"), 1, 51712)


def test_the_default_status_file_is_in_the_control_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLKTAP_CONTROL_DIR", "/tmp/ctl")
    assert diagram.default_status_file() == Path("/tmp/ctl/tapback.vbd3.status.json")
    monkeypatch.delenv("BLKTAP_CONTROL_DIR")
    assert diagram.default_status_file() == Path("/run/blktap-control/tapback.vbd3.status.json")
    assert diagram.default_status_file("/x", "vbd") == Path("/x/tapback.vbd.status.json")


def test_cli_draws_the_live_vbd_with_its_state_marked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = status(tmp_path / "s.json", state="closing")
    out = tmp_path / "out"
    argv = ["backend_vbd", "--live", "1/51712", "--status-file", str(file), "-f", "dot",
            "-o", str(out)]
    assert diagram.main(argv) == 0
    assert capsys.readouterr().out.startswith("backend_vbd 1/51712: closing (tapback ")
    down = (out / "backend_vbd.down.dot").read_text()
    assert next(x for x in down.splitlines() if x.strip().startswith('"closing" [')).count(
        "darksalmon") == 1
    overview = (out / "backend_vbd.dot").read_text()
    assert "darksalmon" in next(x for x in overview.splitlines()
                                if x.strip().startswith('"down" ['))


def test_cli_finds_the_machine_from_the_status_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLKTAP_CONTROL_DIR", str(tmp_path))
    status(tmp_path / "tapback.vbd3.status.json")
    assert diagram.main(["--live", "1/51712", "-f", "mmd", "--stdout"]) == 0
    captured = capsys.readouterr()
    assert "class s_connected active" in captured.out
    assert "backend_vbd 1/51712: connected" in captured.err  # stdout holds only the drawing


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--status-file", "{dir}/absent.json"], "no tapback status file"),
        (["--status-file", "{dir}/stale.json"], "is not running"),
        (["frontend_vbd", "--status-file", "{dir}/s.json"], "runs backend_vbd, not frontend_vbd"),
        (["--status-file", "{dir}/bad.json"], "is not a tapback status file"),
    ],
)
def test_cli_live_errors_are_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    status(tmp_path / "s.json")
    status(tmp_path / "stale.json", pid=dead_pid())
    (tmp_path / "bad.json").write_text("{")
    args = [a.format(dir=tmp_path) for a in argv]
    assert diagram.main([*args, "--live", "1/51712", "--stdout"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("blktap3-diagram: error: ") and message in err
