"""`blktap3-diagram`: draw the machine specs (DOT, SVG, PNG with graphviz; Mermaid text).

    blktap3-diagram [all|NAME...] [-f dot,svg,png,mmd] [-o DIR] [--highlight STATE]
    blktap3-diagram backend_vbd -f mmd --stdout --highlight connected

The drawing is made by transitions' GraphMachine from the same spec the running machines
load, so it cannot drift from the code.  Edges read `trigger [condition, !unless] /
effects`; states show the xenbus number they publish (`connected (4)`) or, for the VBD
inside a tapdisk, its blktap state bits.  Explicitly ignored events are not drawn (see
`blktap3-fsm table`).  `--highlight` marks one state, e.g. the live state of a VBD.
Mermaid is written as text, never through `draw()` (transitions 0.9.3 would put Mermaid
text into a .png).
"""

from __future__ import annotations

import argparse
import errno
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import graphviz
from transitions.extensions import GraphMachine, HierarchicalGraphMachine

from blktap3.fsm.spec import MachineSpec, StateSpec, load_spec, spec_names

FORMATS = ("dot", "svg", "png", "mmd")
DEFAULT_OUT = Path("docs")
GROUP_MIN = 4  # a transition from this many states is drawn once, from a group node
TALL_STATES = 8  # machines with more states are drawn top to bottom, to stay readable


class _Blank:
    """A model that only carries the state attribute for the drawing machine."""


def _labelled(base: type) -> type:
    """transitions 0.9.3 draws a state's `label` but its State classes refuse the keyword."""

    class Labelled(base):  # type: ignore[misc]
        def __init__(self, *args: Any, label: str | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if label is not None:
                self.label = label

    return Labelled


_BASE_STYLES = cast(dict[str, dict[str, Any]], GraphMachine.style_attributes)
_STYLES: dict[str, Any] = {
    **_BASE_STYLES,
    "node": {
        **_BASE_STYLES["node"],
        "group": {"style": "dashed,rounded", "color": "gray40", "fontcolor": "gray25"},
    },
}


class _FlatDrawing(GraphMachine):
    state_cls = _labelled(GraphMachine.state_cls)
    style_attributes = _STYLES


class _NestedDrawing(HierarchicalGraphMachine):
    state_cls = _labelled(HierarchicalGraphMachine.state_cls)
    style_attributes = _STYLES


Engine = Literal["graphviz", "mermaid"]


@dataclass
class Drawing:
    """A drawing machine plus what `render` needs to style it."""

    machine: Any
    group_nodes: list[str]
    caption: str
    listed: list[str]  # internal transitions of many states, not drawn as loops


def _state_label(s: StateSpec) -> str:
    label = s.local.replace("_", " ")
    if s.xenbus is not None:
        label += f" ({s.xenbus})"
    if s.bits:
        label += " [" + "|".join(s.bits) + "]"
    return label


def _state_dict(s: StateSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"name": s.local, "label": _state_label(s)}
    if s.children:
        d["children"] = [_state_dict(c) for c in s.children]
        d["initial"] = s.initial.rsplit("_", 1)[-1] if s.initial else None
    return d


def edge_label(trigger: str, conditions: tuple[str, ...], unless: tuple[str, ...],
               effects: tuple[str, ...]) -> str:
    """`trigger [condition, !unless] / effects`."""
    label = trigger
    guards = list(conditions) + [f"!{u}" for u in unless]
    if guards:
        label += " [" + ", ".join(guards) + "]"
    if effects:
        label += " / " + ", ".join(effects)
    return label


def _group_label(spec: MachineSpec, sources: tuple[str, ...]) -> str:
    every = {s for s in spec.leaves() if s not in spec.final}
    if set(sources) >= every:
        return "any state"
    names = [spec.state(n).local.replace("_", " ") for n in sources]
    lines = [", ".join(names[i:i + 3]) for i in range(0, len(names), 3)]
    return "any of:\\n" + ",\\n".join(lines)


def build(spec: MachineSpec, engine: Engine) -> Drawing:
    """A GraphMachine drawing `spec` (engine: "graphviz" or "mermaid").

    Readability rules: ignored events are left out; an internal transition is a loop on
    its state, except one declared for GROUP_MIN or more states, which is listed in the
    caption instead; any other transition declared for that many states leaves from one
    dashed group node naming them, instead of one edge per state.
    """
    states = [_state_dict(s) for s in spec.states]
    groups: dict[tuple[str, ...], str] = {}
    transitions = []
    listed: list[str] = []
    for t in spec.transitions:
        if t.ignored:
            continue
        answer = (errno.errorcode[t.errno],) if t.errno is not None else ()  # `/ EALREADY`
        label = edge_label(t.trigger, t.conditions, t.unless, t.before + t.after + answer)
        sources = list(t.sources)
        if len(sources) >= GROUP_MIN and t.dest is None:
            listed.append(label)
            continue
        if len(sources) >= GROUP_MIN:
            key = tuple(sorted(sources))
            if key not in groups:
                groups[key] = f"group{len(groups) + 1}"
                states.append({"name": groups[key], "label": _group_label(spec, key)})
            sources = [groups[key]]
        for source in sources:
            transitions.append({"trigger": t.trigger, "source": source,
                                "dest": t.dest or source, "label": label})
    cls = _NestedDrawing if spec.nested else _FlatDrawing
    machine = cls(
        model=_Blank(),
        states=states,
        transitions=transitions,
        initial=spec.initial,
        auto_transitions=False,
        graph_engine=engine,
        title=spec.title,
        show_conditions=False,
    )
    caption = spec.title
    if listed and engine == "graphviz":  # Mermaid's title is one line: see mermaid_source
        caption += "\\nin many states, staying: " + "; ".join(listed)
    if len(spec.leaves()) > TALL_STATES:
        machine.machine_attributes = {**machine.machine_attributes, "rankdir": "TB"}
    return Drawing(machine, sorted(groups.values()), caption, listed)


def render(spec: MachineSpec, engine: Engine, highlight: str | None = None) -> Any:
    """The graph object (graphviz.Digraph, or a Mermaid mock with `.source`)."""
    if highlight is not None:
        spec.state(highlight)  # KeyError for an unknown state
    drawing = build(spec, engine)
    graph = drawing.machine.model_graphs[id(drawing.machine.models[0])]
    graph.reset_styling()  # the drawing model sits in the initial state: no default mark
    for node in drawing.group_nodes:
        graph.set_node_style(node, "group")
    if highlight is not None:
        graph.set_node_style(highlight, "active")
    return graph.get_graph(drawing.caption)


def dot_source(spec: MachineSpec, highlight: str | None = None) -> str:
    # transitions joins the labels of parallel edges with " | ": one per line reads better
    return str(render(spec, "graphviz", highlight).source).replace(" | ", "\\n")


def mermaid_source(spec: MachineSpec, highlight: str | None = None) -> str:
    text = str(render(spec, "mermaid", highlight).source) + "\n"
    listed = build(spec, "mermaid").listed
    if listed:
        text += "%% in many states, staying: " + "; ".join(listed) + "\n"
    return text


def write(name: str, formats: list[str], out: Path, highlight: str | None = None) -> list[Path]:
    """Write `<out>/<name>.<fmt>` for each format; returns the paths written."""
    spec = load_spec(name)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "mmd" in formats:
        path = out / f"{name}.mmd"
        path.write_text(mermaid_source(spec, highlight), encoding="utf-8")
        written.append(path)
    dot = dot_source(spec, highlight)
    if "dot" in formats:
        path = out / f"{name}.dot"
        path.write_text(dot, encoding="utf-8")
        written.append(path)
    for fmt in ("svg", "png"):
        if fmt in formats:
            path = out / f"{name}.{fmt}"
            path.write_bytes(graphviz.Source(dot).pipe(format=fmt))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blktap3-diagram", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["all"], help="machines, or 'all'")
    parser.add_argument("-f", "--formats", default="dot,svg,png,mmd",
                        help=f"comma-separated, from {', '.join(FORMATS)}")
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT,
                        help="output directory (default: ./docs)")
    parser.add_argument("--highlight", metavar="STATE", help="mark this state (e.g. a live VBD's)")
    parser.add_argument("--stdout", action="store_true",
                        help="print the text instead (mmd if it is the only format, else dot)")
    args = parser.parse_args(argv)
    known = spec_names()
    names = known if args.names in ([], ["all"]) else args.names
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        parser.error(f"unknown format(s) {bad}")
    for name in names:
        if name not in known:
            parser.error(f"unknown machine {name!r}; known: {', '.join(known)}")
        if args.highlight is not None:
            try:
                load_spec(name).state(args.highlight)
            except KeyError:
                parser.error(f"{name} has no state {args.highlight!r}")
    if args.stdout:
        for name in names:
            spec = load_spec(name)
            text = (mermaid_source(spec, args.highlight) if formats == ["mmd"]
                    else dot_source(spec, args.highlight))
            sys.stdout.write(text)
        return 0
    for name in names:
        for path in write(name, formats, args.out, args.highlight):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
