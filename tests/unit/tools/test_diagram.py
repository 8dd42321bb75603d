"""The diagram tool: committed diagrams are fresh; labels, highlight and formats work."""

from __future__ import annotations

from pathlib import Path

import pytest
from blktap3.tools import diagram

from blktap3.fsm.spec import load_spec, spec_names

DOCS = Path(__file__).resolve().parents[3] / "docs"
REGENERATE = "run `blktap3-diagram all -o docs` and commit docs/"


@pytest.mark.parametrize("name", spec_names())
def test_committed_diagrams_are_not_stale(name: str) -> None:
    # the DOT and Mermaid text, not the image bytes (they vary with graphviz versions)
    spec = load_spec(name)
    assert (DOCS / f"{name}.dot").read_text() == diagram.dot_source(spec), REGENERATE
    assert (DOCS / f"{name}.mmd").read_text() == diagram.mermaid_source(spec), REGENERATE
    assert (DOCS / f"{name}.svg").stat().st_size > 0, REGENERATE
    assert (DOCS / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", REGENERATE


def test_states_show_their_xenbus_number_and_edges_their_guards_and_effects() -> None:
    dot = diagram.dot_source(load_spec("backend_vbd"))
    assert 'connected [label="connected (4)' in dot
    assert 'closing [label="closing (5)' in dot
    assert ("disk_info_read [frontend_ready] / record_disk, write_probe_keys, "
            "read_transport") in dot
    assert "ignore" not in dot  # ignored events are in the table, not the drawing


def test_vbd_states_show_their_blktap_bits() -> None:
    dot = diagram.dot_source(load_spec("tapdisk_vbd"))
    assert "paused [CLOSED|QUIESCED|PAUSED]" in dot


def test_highlight_marks_exactly_one_state() -> None:
    spec = load_spec("backend_vbd")
    assert "darksalmon" not in diagram.dot_source(spec)
    dot = diagram.dot_source(spec, highlight="connected")
    line = next(x for x in dot.splitlines() if x.strip().startswith("connected ["))
    assert "darksalmon" in line and "peripheries=2" in line
    assert dot.count("darksalmon") == 1
    mmd = diagram.mermaid_source(spec, highlight="connected")
    assert "Class connected s_active" in mmd


def test_highlight_of_a_nested_state() -> None:
    dot = diagram.dot_source(load_spec("tapdisk_vbd"), highlight="open_paused")
    assert dot.count("darksalmon") == 1


def test_highlight_of_an_unknown_state_is_refused() -> None:
    with pytest.raises(KeyError):
        diagram.dot_source(load_spec("backend_vbd"), highlight="dancing")


def test_mermaid_is_text_with_a_state_diagram() -> None:
    mmd = diagram.mermaid_source(load_spec("frontend_vbd"))
    assert "stateDiagram-v2" in mmd
    assert "[*] --> initialising" in mmd


def test_cli_writes_every_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert diagram.main(["frontend_vbd", "-o", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [f"frontend_vbd.{ext}" for ext in ("dot", "mmd", "png", "svg")]
    assert (tmp_path / "frontend_vbd.png").read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in (tmp_path / "frontend_vbd.svg").read_text()
    assert "frontend_vbd.png" in capsys.readouterr().out


def test_cli_prints_highlighted_mermaid(capsys: pytest.CaptureFixture[str]) -> None:
    assert diagram.main(["backend_vbd", "-f", "mmd", "--stdout", "--highlight", "closed"]) == 0
    assert "Class closed s_active" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["nope"], ["backend_vbd", "-f", "gif"], ["backend_vbd", "--highlight", "nowhere"]],
)
def test_cli_refuses_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        diagram.main([*argv, "--stdout"])
    assert info.value.code == 2
