"""`blktap3-fsm`: the checks as a command, with the back-end's table printed."""

from __future__ import annotations

import re
import tomllib
from dataclasses import replace
from importlib.resources import files

import pytest
from blktap3.tools import fsm_cli

from blktap3.fsm.spec import MachineSpec, load_spec, parse_spec, row_lines


def test_check_all_passes_and_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert fsm_cli.main(["check"]) == 0
    out = capsys.readouterr().out
    for name in ("backend_vbd", "frontend_vbd", "tapdisk_process", "tapdisk_vbd"):
        assert f"{name}: ok" in out
    assert "unknown  initialising" in out  # the back-end's table
    assert re.search(r"^failed .* ignore +@failed$", out, re.M)  # and each state's phase
    # the front-end's table: every back-end state, and an absent or unparsable node
    assert "frontend_vbd: backend_<state> events, by state" in out
    assert "reconfigured  invalid  vanished" in out


def test_check_fails_on_a_hole_in_the_backend(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec("backend_vbd")
    holed = replace(spec, transitions=tuple(
        t for t in spec.transitions if t.trigger != "frontend_reconfigured"))

    def fake_load(name: str) -> MachineSpec:
        return holed if name == "backend_vbd" else load_spec(name)

    monkeypatch.setattr(fsm_cli, "load_spec", fake_load)
    assert fsm_cli.main(["check", "backend_vbd"]) == 1
    out = capsys.readouterr().out
    # a hole in every state where it failed the VBD: all but `failed` (ignored there)
    holes = sum(1 for t in spec.transitions if t.trigger == "frontend_reconfigured"
                for _ in t.sources)
    assert holes >= 7
    assert f"backend_vbd: {holes} problem(s)" in out
    assert "'frontend_reconfigured' is neither handled nor ignored in 'connected'" in out


def test_check_reports_an_unknown_phase_with_the_file_and_row(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = files("blktap3.specs").joinpath("backend_vbd.toml").read_text(encoding="utf-8")
    assert text.count('"@handshake"') > 1
    typo = text.replace('"@handshake"', '"@handshakes"', 1)

    def fake_load(name: str) -> MachineSpec:
        if name != "backend_vbd":
            return load_spec(name)
        return parse_spec(tomllib.loads(typo), "backend_vbd.toml", row_lines(typo))

    monkeypatch.setattr(fsm_cli, "load_spec", fake_load)
    assert fsm_cli.main(["check", "backend_vbd"]) == 1
    out = capsys.readouterr().out
    assert "backend_vbd: 1 problem(s)" in out
    assert re.search(r"backend_vbd\.toml:\d+: transitions\[\d+\]: unknown phase '@handshakes'", out)


def test_list_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert fsm_cli.main(["list"]) == 0
    assert "tapdisk_vbd" in capsys.readouterr().out
    assert fsm_cli.main(["table", "frontend_vbd"]) == 0
    assert capsys.readouterr().out.startswith("state")
