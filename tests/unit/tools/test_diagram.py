"""The diagram tool: committed diagrams are fresh and fit a screen; phases are clusters;
every spec row is drawn; highlight, formats and errors work; graphviz is optional."""

from __future__ import annotations

import errno
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from blktap3.tools import diagram

from blktap3.fsm.spec import MachineSpec, TransitionSpec, load_spec, spec_names

ROOT = Path(__file__).resolve().parents[3]
DOCS = ROOT / "docs"
REGENERATE = "run `blktap3-diagram all -o docs` and commit docs/"
MAX_PNG_WIDTH = 1600  # one screen, at graphviz's default scale


def all_drawings() -> list[tuple[str, diagram.Drawing]]:
    return [(name, d) for name in spec_names() for d in diagram.drawings(load_spec(name))]


def drawn_rows(spec: MachineSpec) -> list[TransitionSpec]:
    return [t for t in spec.transitions if not t.ignored]


def labels_of(d: diagram.Drawing) -> set[str]:
    """Every transition label a drawing shows: edges, cluster notes, caption notes."""
    shown = {label for e in d.edges for label in e.labels}
    shown |= {n for c in d.clusters.values() for n in c.notes}
    return shown | set(d.notes)


def row_label(t: TransitionSpec) -> str:
    answer = (errno.errorcode[t.errno],) if t.errno is not None else ()  # a refusing row
    return diagram.edge_label(t.trigger, t.conditions, t.unless, t.before + t.after + answer)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is no PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


# --- committed drawings -------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "drawing"), all_drawings(),
                         ids=[d.stem for _, d in all_drawings()])
def test_committed_diagrams_are_not_stale(name: str, drawing: diagram.Drawing) -> None:
    # the DOT and Mermaid text, not the image bytes (they vary with graphviz versions)
    assert (DOCS / f"{drawing.stem}.dot").read_text() == diagram.to_dot(drawing), REGENERATE
    assert (DOCS / f"{drawing.stem}.mmd").read_text() == diagram.to_mermaid(drawing), REGENERATE
    assert "<svg" in (DOCS / f"{drawing.stem}.svg").read_text(), REGENERATE
    png_size(DOCS / f"{drawing.stem}.png")


def test_docs_holds_no_drawing_that_the_specs_no_longer_make() -> None:
    expected = {f"{d.stem}.{fmt}" for _, d in all_drawings() for fmt in diagram.FORMATS}
    present = {p.name for p in DOCS.iterdir() if p.suffix.lstrip(".") in diagram.FORMATS}
    assert present == expected, REGENERATE


@pytest.mark.parametrize("png", sorted(DOCS.glob("*.png")), ids=lambda p: p.name)
def test_every_committed_png_fits_one_screen(png: Path) -> None:
    width, _ = png_size(png)
    assert width <= MAX_PNG_WIDTH, f"{png.name} is {width} px wide"


def test_the_readme_shows_every_drawing() -> None:
    readme = (ROOT / "README.md").read_text()
    for _, d in all_drawings():
        assert f"(docs/{d.stem}.svg)" in readme, d.stem


# --- what is drawn ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", spec_names())
def test_the_whole_drawing_shows_every_row_and_nothing_else(name: str) -> None:
    spec = load_spec(name)
    assert labels_of(diagram.whole(spec)) == {row_label(t) for t in drawn_rows(spec)}


def test_each_phase_drawing_shows_exactly_the_rows_leaving_its_states() -> None:
    spec = load_spec("backend_vbd")
    for phase in spec.phases:
        rows = [t for t in drawn_rows(spec) if set(t.sources) & set(phase.states)]
        if not rows:
            assert phase.name == "gone"  # final states: nothing leaves, no drawing
            continue
        detail = diagram.detail(spec, phase.name)
        assert labels_of(detail) == {row_label(t) for t in rows}, phase.name


def test_a_machine_with_phases_is_an_overview_and_a_drawing_per_phase() -> None:
    stems = [d.stem for d in diagram.drawings(load_spec("backend_vbd"))]
    assert stems == ["backend_vbd", "backend_vbd.hotplug", "backend_vbd.adopt",
                     "backend_vbd.handshake", "backend_vbd.up", "backend_vbd.down",
                     "backend_vbd.failed"]
    assert [d.stem for d in diagram.drawings(load_spec("backend_vbd"), one_piece=True)] == [
        "backend_vbd"]
    assert [d.stem for d in diagram.drawings(load_spec("frontend_vbd"))] == ["frontend_vbd"]


def test_the_overview_links_phases_by_the_triggers_between_them() -> None:
    spec = load_spec("backend_vbd")
    view = diagram.overview(spec)
    assert list(view.nodes) == [p.name for p in spec.phases]
    edges = {(e.tail, e.head): e.labels for e in view.edges}
    assert all(tail != head for tail, head in edges)  # a phase's inside is its own drawing
    assert edges[("hotplug", "adopt")] == ["hotplug_connected"]
    assert "transport_read" in edges[("handshake", "up")]
    assert ("gone", "hotplug") not in edges
    for t in drawn_rows(spec):  # every change of phase is there, under its trigger
        for s in t.sources:
            tail, head = spec.phase_of(s), spec.phase_of(t.dest) if t.dest else None
            if tail and head and tail != head:
                assert t.trigger in edges[(tail.name, head.name)]
    assert view.initial == "hotplug"


def test_phases_are_clusters_and_a_row_from_a_whole_phase_leaves_it_once() -> None:
    spec = load_spec("backend_vbd")
    dot = diagram.to_dot(diagram.whole(spec))
    for phase in spec.phases:
        assert f'subgraph "cluster_{phase.name}"' in dot
    handshake = diagram.detail(spec, "handshake")
    closing = [e for e in handshake.edges if "frontend_closing" in e.labels]
    # from every state of the phase where it can arrive: not from reading_transport,
    # which awaits the transport keys
    assert [(e.tail, e.head) for e in closing] == [("handshake__any", "closing")]
    assert handshake.nodes["handshake__any"].cluster == "cluster_handshake"
    up = diagram.detail(spec, "up")  # one state of it receives frontend_closing: from it
    assert [(e.tail, e.head) for e in up.edges if "frontend_closing" in e.labels] == [
        ("connected", "closing")]
    # a row from part of a phase is drawn from its states
    down = diagram.detail(spec, "down")
    offline = [e.tail for e in down.edges if "offline / note_offline" in e.labels]
    assert offline == ["closing"]
    mmd = diagram.to_mermaid(handshake)
    assert "subgraph c_handshake [" in mmd
    assert 's_handshake__any -->|"frontend_closing"| s_closing' in mmd


def test_states_of_other_phases_are_drawn_dashed_in_their_own_phase() -> None:
    up = diagram.detail(load_spec("backend_vbd"), "up")
    assert up.nodes["closing"].context and up.nodes["closing"].cluster == "cluster_down"
    assert up.clusters["cluster_down"].context
    assert not up.nodes["connected"].context
    assert 'style="rounded,dashed"' in next(
        line for line in diagram.to_dot(up).splitlines() if line.strip().startswith('"closing"'))


def test_a_row_staying_in_every_state_of_a_phase_is_listed_under_it() -> None:
    handshake = diagram.detail(load_spec("backend_vbd"), "handshake")
    note = "image_changed [tapdisk_known] / query_disk"
    assert note in handshake.clusters["cluster_handshake"].notes
    assert not any(note in e.labels for e in handshake.edges)
    assert f"staying: {note}" in diagram.to_dot(handshake)


def test_states_show_their_xenbus_number_and_edges_their_guards_and_effects() -> None:
    dot = diagram.to_dot(diagram.detail(load_spec("backend_vbd"), "hotplug"))
    assert '"adopting" [label="adopting"' in dot
    assert '"init_wait" [label="init wait (2)"' in dot
    assert ("disk_info_read\\l  [frontend_is_initialising]\\l  / record_disk,\\l"
            "  write_probe_keys\\l") in dot
    assert "ignore" not in dot  # ignored events are in the table, not the drawing


def test_vbd_states_show_their_blktap_bits() -> None:
    dot = diagram.dot_source(load_spec("tapdisk_vbd"))
    assert 'label="paused\\n[CLOSED|QUIESCED|PAUSED]"' in dot
    assert 'label="quiescing\\n[QUIESCE_REQUESTED|\\nPAUSE_REQUESTED]"' in dot


def test_a_nested_machine_leaves_a_parent_state_from_its_any_state_node() -> None:
    d = diagram.whole(load_spec("tapdisk_process"))
    assert ("running__any", "dead") in {(e.tail, e.head) for e in d.edges}
    # entering a parent enters its initial child
    assert ("spawning", "running_idle") in {(e.tail, e.head) for e in d.edges}


def test_long_labels_wrap_and_continuation_lines_are_indented() -> None:
    label = "hotplug_connected [frontend_ready] / record_tapdisk, write_probe_keys, read_transport"
    lines = diagram.wrap(label, 28)
    assert lines == ["hotplug_connected", "  [frontend_ready]", "  / record_tapdisk,",
                     "  write_probe_keys,", "  read_transport"]
    assert diagram.wrap("ring_connected", 28) == ["ring_connected"]


# --- marking a state ----------------------------------------------------------------------------


def test_highlight_marks_exactly_one_node_in_each_drawing_that_shows_the_state() -> None:
    spec = load_spec("backend_vbd")
    parts = {d.stem: d for d in diagram.drawings(spec)}
    assert "darksalmon" not in diagram.to_dot(parts["backend_vbd.up"])
    dot = diagram.to_dot(parts["backend_vbd.up"], highlight="connected")
    line = next(x for x in dot.splitlines() if x.strip().startswith('"connected" ['))
    assert "darksalmon" in line and "peripheries=2" in line
    assert dot.count("darksalmon") == 1
    overview = diagram.to_dot(parts["backend_vbd"], highlight="connected")
    line = next(x for x in overview.splitlines() if x.strip().startswith('"up" ['))
    assert "darksalmon" in line and overview.count("darksalmon") == 1
    # a drawing that does not show the state marks nothing
    assert "darksalmon" not in diagram.to_dot(parts["backend_vbd.failed"], highlight="connected")
    # one that shows it as where an edge leads marks it there
    adopt = diagram.to_dot(parts["backend_vbd.adopt"], highlight="connected")
    line = next(x for x in adopt.splitlines() if x.strip().startswith('"connected" ['))
    assert "darksalmon" in line and adopt.count("darksalmon") == 1
    mmd = diagram.to_mermaid(parts["backend_vbd.up"], highlight="connected")
    assert "class s_connected active" in mmd


def test_highlight_of_a_nested_state() -> None:
    dot = diagram.dot_source(load_spec("tapdisk_vbd"), highlight="open_paused")
    assert dot.count("darksalmon") == 1


def test_highlight_of_an_unknown_state_is_refused() -> None:
    with pytest.raises(KeyError):
        diagram.dot_source(load_spec("backend_vbd"), highlight="dancing")


def test_mermaid_is_a_flowchart_whose_ids_cannot_be_keywords() -> None:
    mmd = diagram.mermaid_source(load_spec("frontend_vbd"))
    assert "\nflowchart TB\n" in mmd
    assert "__start(( )):::start --> s_initialising" in mmd
    overview = diagram.to_mermaid(diagram.overview(load_spec("backend_vbd")))
    assert 's_down("DOWN<br>closing (5)' in overview  # `end`, `class`... would break


# --- the command --------------------------------------------------------------------------------


def test_cli_writes_every_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert diagram.main(["frontend_vbd", "-o", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [f"frontend_vbd.{ext}" for ext in ("dot", "mmd", "png", "svg")]
    assert (tmp_path / "frontend_vbd.png").read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in (tmp_path / "frontend_vbd.svg").read_text()
    assert "frontend_vbd.png" in capsys.readouterr().out


def test_cli_draws_a_machine_with_phases_in_one_piece_on_request(tmp_path: Path) -> None:
    assert diagram.main(["backend_vbd", "-f", "dot", "--whole", "-o", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["backend_vbd.dot"]
    assert 'subgraph "cluster_handshake"' in (tmp_path / "backend_vbd.dot").read_text()


def test_cli_prints_highlighted_mermaid(capsys: pytest.CaptureFixture[str]) -> None:
    assert diagram.main(["backend_vbd", "-f", "mmd", "--stdout", "--highlight", "closed"]) == 0
    assert "class s_closed active" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [["nope", "--stdout"], ["backend_vbd", "-f", "gif", "--stdout"],
     ["backend_vbd", "--highlight", "nowhere", "--stdout"],
     ["backend_vbd", "--highlight", "closed"],  # marked drawings never go to docs/
     ["backend_vbd", "--live", "1-51712", "--stdout"],
     ["backend_vbd", "--status-file", "x.json", "--stdout"]],
)
def test_cli_refuses_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        diagram.main(argv)
    assert info.value.code == 2


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("blktap3-diagram: error: ")
    return err


def test_an_output_path_that_is_a_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o /etc/passwd` (issue 17): argparse's line and the usage, exit 2, nothing written."""
    occupied = tmp_path / "passwd"
    occupied.write_text("root:x:0:0\n")
    for out in (occupied, occupied / "sub"):
        with pytest.raises(SystemExit) as stopped:
            diagram.main(["frontend_vbd", "-f", "dot", "-o", str(out)])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith("usage: blktap3-diagram")
        assert err.splitlines()[-1].startswith(f"blktap3-diagram: error: argument -o/--out: {out}")
    assert occupied.read_text() == "root:x:0:0\n"


def test_svg_and_png_without_the_graphviz_package_say_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "graphviz", None)  # `import graphviz` fails
    assert diagram.main(["frontend_vbd", "-f", "dot,png", "-o", str(tmp_path)]) == 1
    assert "pip install 'blktap3[diagrams]'" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    assert diagram.main(["all", "-f", "dot,mmd", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "backend_vbd.handshake.mmd").is_file()


def test_svg_without_graphviz_s_dot_program_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` there
    assert diagram.main(["frontend_vbd", "-f", "svg", "-o", str(tmp_path / "out")]) == 1
    assert "apt-get install graphviz" in one_line_error(capsys)


def test_the_module_does_not_import_graphviz() -> None:
    probe = "import sys, blktap3.tools.diagram; print('graphviz' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False"]
