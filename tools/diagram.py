"""`blktap3-diagram`: draw the machine specs: DOT and Mermaid text, SVG and PNG through graphviz.

    blktap3-diagram [all|NAME...] [-f dot,svg,png,mmd] [-o DIR] [--whole]
    blktap3-diagram NAME --highlight STATE (-o DIR | --stdout)
    blktap3-diagram backend_vbd --live DOMID/DEVID [--status-file FILE] (-o DIR | --stdout)

What is drawn is the spec the running machines load (`load_spec`, phases expanded), so a
drawing cannot drift from the code.  The text is written here rather than by transitions'
GraphMachine, which can neither cluster a flat machine's phases nor write DOT without the
graphviz package.

- States show the xenbus number they publish (`connected (4)`) or blktap's VBD state bits.
  Edges read `trigger [condition, !unless] / effects` (a refusing row's effect is its
  errno: `/ EALREADY`); parallel ones share one edge, a line each.  Explicitly ignored
  events are not drawn (`blktap3-fsm table` shows them).
- Phases, and a nested machine's parent states, are clusters.  A transition from every
  state of a cluster leaves the cluster once (a compound edge); one that stays (internal)
  in every state of a cluster is listed under the cluster's name.
- A machine that declares phases is drawn as an overview (a node per phase, the triggers
  that lead from one phase to another) plus one drawing per phase: its states, what
  leaves them, and the states that leads to (dashed, in their own phase).  `--whole`
  draws any machine in one piece; `--stdout` always does.
- `--highlight STATE` marks a state (in the overview, its phase); `--live DOMID/DEVID`
  marks the state a running tapback reports for that VBD in its status file.
- DOT and Mermaid need nothing beyond this package.  SVG and PNG need the graphviz Python
  package (`pip install 'blktap3[diagrams]'`) and graphviz's `dot` program (Debian:
  `graphviz`); without them those two formats fail with a line saying so.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blktap3 import cmdline
from blktap3.ctl import runtime
from blktap3.fsm.errors import SpecError
from blktap3.fsm.spec import MachineSpec, StateSpec, TransitionSpec, load_spec, spec_names

FORMATS = ("dot", "svg", "png", "mmd")
DEFAULT_OUT = Path("docs")
WRAP = 28  # an edge label line longer than this breaks between its effects
BITS_WRAP = 24  # a line of a state's blktap bits
DOC_WRAP = 56  # a phase's doc, under its name
START = "__start"  # the dot the initial arrow leaves from
INSTALL_HINT = ("pip install 'blktap3[diagrams]' (the graphviz package), "
                "and graphviz's dot program (Debian: apt-get install graphviz)")


class DiagramError(Exception):
    """What stops the command, in one line (exit status 1)."""


# --- what a drawing holds ----------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    id: str
    label: str
    cluster: str | None = None
    context: bool = False  # a state of another phase, drawn where an edge leads out
    tooltip: str = ""
    any: bool = False  # "any state" of its cluster: transitions from all of them leave here


@dataclass
class Cluster:
    id: str
    label: str
    parent: str | None = None
    context: bool = False
    tooltip: str = ""
    notes: list[str] = field(default_factory=list)  # transitions staying in every state


@dataclass
class Edge:
    tail: str
    head: str
    labels: list[str]


@dataclass
class Drawing:
    """One picture: nodes, clusters, edges, and which nodes show which state."""

    stem: str  # file name without the format
    title: str
    nodes: dict[str, Node] = field(default_factory=dict)
    clusters: dict[str, Cluster] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    initial: str | None = None
    notes: list[str] = field(default_factory=list)  # transitions staying in every state
    marks: dict[str, str] = field(default_factory=dict)  # state -> the node showing it
    rankdir: str = "TB"  # LR for a phase: its states on the left, where they lead on the right

    def node(self, node: Node, state: str | None = None) -> None:
        self.nodes.setdefault(node.id, node)
        if state is not None:
            self.marks.setdefault(state, node.id)

    def edge(self, tail: str, head: str, label: str) -> None:
        """Add an edge, or a line to the label of the same edge drawn already."""
        for e in self.edges:
            if (e.tail, e.head) == (tail, head):
                if label not in e.labels:
                    e.labels.append(label)
                return
        self.edges.append(Edge(tail, head, [label]))

    def any_state(self, cluster: str) -> str:
        """The node that transitions from every state of `cluster` leave from."""
        node = f"{cluster.removeprefix('cluster_')}__any"
        self.node(Node(node, "any state", cluster, any=True,
                       tooltip=f"every state of {cluster.removeprefix('cluster_')}"))
        return node


# --- labels ------------------------------------------------------------------------------------


def state_label(s: StateSpec) -> str:
    label = s.local.replace("_", " ")
    if s.xenbus is not None:
        label += f" ({s.xenbus})"
    if s.bits:  # blktap's names are long: a line holds what fits in about a state name
        lines = [""]
        for i, bit in enumerate(s.bits):
            piece = ("[" if i == 0 else "") + bit + ("]" if i == len(s.bits) - 1 else "|")
            if lines[-1] and len(lines[-1]) + len(piece) > BITS_WRAP:
                lines.append("")
            lines[-1] += piece
        label += "\n" + "\n".join(lines)
    return label


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


def _label(t: TransitionSpec) -> str:
    answer = (errno.errorcode[t.errno],) if t.errno is not None else ()  # `/ EALREADY`
    return edge_label(t.trigger, t.conditions, t.unless, t.before + t.after + answer)


def wrap(label: str, width: int = WRAP) -> list[str]:
    """Lines of at most `width` where possible: breaks before ` [` and ` / `, after `, `;
    continuation lines are indented so that parallel transitions stay apart."""
    tokens = [t for t in re.split(r"(?<=, )|(?= / )|(?= \[)", label) if t]
    lines = [tokens[0]]
    for token in tokens[1:]:
        if len(lines[-1]) + len(token.rstrip()) > width:
            lines[-1] = lines[-1].rstrip()
            lines.append("  " + token.lstrip())
        else:
            lines[-1] += token
    return lines


def _wrap_text(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


# --- building drawings from a spec -------------------------------------------------------------


def _cid(name: str) -> str:
    return f"cluster_{name}"


def _drawn(spec: MachineSpec) -> list[TransitionSpec]:
    return [t for t in spec.transitions if not t.ignored]


def _add_state_tree(d: Drawing, spec: MachineSpec, states: tuple[StateSpec, ...],
                    parent: str | None) -> None:
    for s in states:
        if s.children:
            d.clusters[_cid(s.name)] = Cluster(_cid(s.name), state_label(s), parent,
                                               tooltip=s.doc)
            _add_state_tree(d, spec, s.children, _cid(s.name))
        else:
            d.node(Node(s.name, state_label(s), parent, tooltip=s.doc), s.name)


def _receivers(spec: MachineSpec, states: Iterable[str], trigger: str) -> set[str]:
    """Those of `states` where `trigger` can arrive: a state that awaits an answer
    receives nothing else (so a row from the rest of its phase leaves the whole phase)."""
    return {s for s in states if not spec.state(s).awaits or trigger in spec.state(s).awaits}


def _groups(d: Drawing, spec: MachineSpec, trigger: str) -> dict[str, set[str]]:
    """Clusters a flat machine's row may leave at once: phases of two or more states
    (each with its states where `trigger` can arrive)."""
    return {_cid(p.name): _receivers(spec, p.states, trigger) for p in spec.phases
            if len(p.states) > 1 and _cid(p.name) in d.clusters}


def _context(d: Drawing, spec: MachineSpec, state: str) -> None:
    """Draw `state` (of another phase) where an edge leads, dashed, inside its phase."""
    if state in d.nodes:
        return
    phase = spec.phase_of(state)
    cluster = None
    if phase is not None:
        cluster = _cid(phase.name)
        if cluster not in d.clusters:
            d.clusters[cluster] = Cluster(cluster, phase.name, context=True, tooltip=phase.doc)
    d.node(Node(state, state_label(spec.state(state)), cluster, context=True,
                tooltip=spec.state(state).doc), state)


def _draw_row(d: Drawing, spec: MachineSpec, t: TransitionSpec, sources: list[str]) -> None:
    """Draw one spec row from `sources` (its states that this drawing shows)."""
    label = _label(t)
    clusters: list[str] = []  # rows from every state of these clusters
    states: list[str] = []  # and from these states
    if spec.nested:
        for s in sources:
            (clusters if spec.state(s).children else states).append(s)
        clusters = [_cid(s) for s in clusters]
    else:
        states = list(sources)
        for cluster, members in _groups(d, spec, t.trigger).items():
            if len(members) > 1 and members <= set(states):
                clusters.append(cluster)
                states = [s for s in states if s not in members]
    if t.dest is None:  # internal: a loop, or a note under a cluster
        for cluster in clusters:
            d.clusters[cluster].notes.append(label)
        for s in states:
            d.edge(s, s, label)
        return
    head = spec.entry_leaf(t.dest)  # entering a parent state enters its initial child
    if head not in d.nodes:
        _context(d, spec, head)
    for node in [*(d.any_state(c) for c in clusters), *states]:
        d.edge(node, head, label)


def whole(spec: MachineSpec) -> Drawing:
    """The machine in one piece: every state, phases or parent states as clusters."""
    d = Drawing(spec.name, spec.title)
    if spec.phases:
        for p in spec.phases:
            d.clusters[_cid(p.name)] = Cluster(_cid(p.name), p.name, tooltip=p.doc)
            for s in p.states:
                state = spec.state(s)
                d.node(Node(s, state_label(state), _cid(p.name), tooltip=state.doc), s)
    else:
        _add_state_tree(d, spec, spec.states, None)
    d.initial = spec.entry_leaf(spec.initial)
    everywhere = {s for s in spec.leaves() if s not in spec.final}
    for t in _drawn(spec):
        if t.dest is None and set(t.sources) >= _receivers(spec, everywhere, t.trigger):
            d.notes.append(_label(t))  # staying in every state: said once, in the caption
        else:
            _draw_row(d, spec, t, list(t.sources))
    return d


def overview(spec: MachineSpec) -> Drawing:
    """A node per phase (with its states), an edge per pair of phases a trigger links."""
    d = Drawing(spec.name, f"{spec.title}: phases")
    for p in spec.phases:
        lines = [p.name.upper(), *(state_label(spec.state(s)) for s in p.states)]
        d.node(Node(p.name, "\n".join(lines), tooltip=p.doc))
        for s in p.states:
            d.marks[s] = p.name
    d.initial = d.marks[spec.initial]
    for t in _drawn(spec):
        if t.dest is None:
            continue
        for s in t.sources:
            tail, head = d.marks[s], d.marks[t.dest]
            if tail != head:
                d.edge(tail, head, t.trigger)
    return d


def detail(spec: MachineSpec, phase: str) -> Drawing:
    """One phase: its states, every transition that leaves them, where those lead."""
    p = spec.phase(phase)
    d = Drawing(f"{spec.name}.{p.name}", f"{spec.title}: phase {p.name}", rankdir="LR")
    label = "\n".join([p.name.upper(), *_wrap_text(p.doc, DOC_WRAP)])
    d.clusters[_cid(p.name)] = Cluster(_cid(p.name), label, tooltip=p.doc)
    for s in p.states:
        state = spec.state(s)
        d.node(Node(s, state_label(state), _cid(p.name), tooltip=state.doc), s)
    if spec.initial in p.states:
        d.initial = spec.initial
    for t in _drawn(spec):
        here = [s for s in t.sources if s in p.states]
        if here:
            _draw_row(d, spec, t, here)
    return d


def drawings(spec: MachineSpec, one_piece: bool = False) -> list[Drawing]:
    """What `blktap3-diagram` writes for `spec`: one drawing, or (a machine with phases)
    the overview, then a drawing per phase that any transition leaves."""
    if one_piece or not spec.phases:
        return [whole(spec)]
    parts = [overview(spec)]
    for p in spec.phases:
        if any(set(t.sources) & set(p.states) for t in _drawn(spec)):
            parts.append(detail(spec, p.name))
    return parts


# --- DOT -----------------------------------------------------------------------------------------


def _dq(text: str) -> str:
    """A DOT string; `\\n` ends a centred line, `\\l` a left-justified one."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_lines(lines: list[str]) -> str:
    """Left-justified lines (continuation indents survive)."""
    return '"' + "".join(x.replace("\\", "\\\\").replace('"', '\\"') + "\\l" for x in lines) + '"'


def _edge_text(labels: list[str]) -> list[str]:
    return [line for label in labels for line in wrap(label)]


def _caption(d: Drawing) -> str:
    """The title, and a line per transition that stays in every state."""
    return "\n".join([d.title, *(f"in every state, staying: {n}" for n in d.notes)])


_NODE_STYLE = 'shape=rectangle style="rounded,filled" fillcolor=white fontsize=12'
_CONTEXT_STYLE = 'style="rounded,dashed" color=gray45 fontcolor=gray30'
_ANY_STYLE = 'shape=plain fontcolor=gray25 fontsize=11'
_ACTIVE_STYLE = "color=red fillcolor=darksalmon peripheries=2"


def to_dot(d: Drawing, highlight: str | None = None) -> str:
    """The drawing as DOT; `highlight` (a state) marks the node showing it."""
    marked = d.marks.get(highlight) if highlight is not None else None
    out = [f"digraph {_dq(d.stem)} {{",
           f"\tgraph [rankdir={d.rankdir} ranksep=0.3 nodesep=0.2 fontsize=14 labelloc=t "
           f"label={_dq(_caption(d))}]",
           f"\tnode [{_NODE_STYLE}]",
           "\tedge [fontsize=10]"]
    start = f'{START} [shape=point width=0.12 label="" tooltip="initial"]'
    start_in = d.nodes[d.initial].cluster if d.initial is not None else None
    if d.initial is not None and start_in is None:
        out.append(f"\t{start}")

    def node_line(n: Node, indent: str) -> str:
        attrs = [f"label={_dq(n.label)}"]
        if n.tooltip:
            attrs.append(f"tooltip={_dq(n.tooltip)}")
        if n.context:
            attrs.append(_CONTEXT_STYLE)
        if n.any:
            attrs.append(_ANY_STYLE)
        if n.id == marked:
            attrs.append(_ACTIVE_STYLE)
        return f"{indent}{_dq(n.id)} [{' '.join(attrs)}]"

    def cluster_lines(c: Cluster, indent: str) -> list[str]:
        lines = c.label.split("\n") + [f"staying: {n}" for n in c.notes]
        style = ('style="rounded,dashed" color=gray55 fontcolor=gray35' if c.context
                 else "style=rounded color=gray25")
        body = [f"{indent}subgraph {_dq(c.id)} {{",
                f"{indent}\tgraph [label={_dot_lines(lines)} labeljust=l {style}"
                + (f" tooltip={_dq(c.tooltip)}" if c.tooltip else "") + "]"]
        if c.id == start_in:
            body.append(f"{indent}\t{start}")
        body += [node_line(n, indent + "\t") for n in d.nodes.values() if n.cluster == c.id]
        for child in d.clusters.values():
            if child.parent == c.id:
                body += cluster_lines(child, indent + "\t")
        return [*body, f"{indent}}}"]

    for c in d.clusters.values():
        if c.parent is None:
            out += cluster_lines(c, "\t")
    out += [node_line(n, "\t") for n in d.nodes.values() if n.cluster is None]
    if d.initial is not None:
        out.append(f"\t{START} -> {_dq(d.initial)}")
    for e in d.edges:
        out.append(f"\t{_dq(e.tail)} -> {_dq(e.head)} "
                   f"[label={_dot_lines(_edge_text(e.labels))}]")
    return "\n".join([*out, "}"]) + "\n"


# --- Mermaid -------------------------------------------------------------------------------------
# A flowchart, not a stateDiagram: Mermaid's state diagrams cannot link states inside two
# different composite states, which is what every edge between phases does.  Ids get a
# prefix so that no state or phase name can be a Mermaid keyword (`end`, `class`, ...).


def _mq(lines: list[str]) -> str:
    """A quoted Mermaid label: `<br>` between lines, entity codes for what would break."""
    escaped = [x.replace("#", "#35;").replace('"', "#quot;").replace("<", "#lt;")
               .replace(">", "#gt;") for x in lines]
    escaped = [re.sub(r"^ +", lambda m: "#160;" * len(m.group()), x) for x in escaped]
    return '"' + "<br>".join(escaped) + '"'


def _mid(node_or_cluster: str) -> str:
    return ("c_" + node_or_cluster.removeprefix("cluster_")
            if node_or_cluster.startswith("cluster_") else "s_" + node_or_cluster)


def to_mermaid(d: Drawing, highlight: str | None = None) -> str:
    """The drawing as a Mermaid flowchart; `highlight` marks the node showing a state."""
    marked = d.marks.get(highlight) if highlight is not None else None
    title = _caption(d).replace("\n", " | ")
    out = ["---", f"title: {json.dumps(title)}", "---", f"flowchart {d.rankdir}",
           "  classDef state fill:white,stroke:black",
           "  classDef context fill:white,stroke:gray,stroke-dasharray:4 3,color:#555",
           "  classDef active fill:darksalmon,stroke:red,stroke-width:3px",
           "  classDef start fill:black,stroke:black",
           "  classDef any fill:none,stroke:none,color:#444"]

    def node_line(n: Node, indent: str) -> str:
        shape = "[{}]" if n.any else "({})"
        return indent + _mid(n.id) + shape.format(_mq(n.label.split("\n")))

    def cluster_lines(c: Cluster, indent: str) -> list[str]:
        lines = c.label.split("\n") + [f"staying: {n}" for n in c.notes]
        body = [f"{indent}subgraph {_mid(c.id)} [{_mq(lines)}]"]
        body += [node_line(n, indent + "  ") for n in d.nodes.values() if n.cluster == c.id]
        for child in d.clusters.values():
            if child.parent == c.id:
                body += cluster_lines(child, indent + "  ")
        return [*body, f"{indent}end"]

    if d.initial is not None:
        out.append(f'  {START}(( )):::start --> {_mid(d.initial)}')
    for c in d.clusters.values():
        if c.parent is None:
            out += cluster_lines(c, "  ")
    out += [node_line(n, "  ") for n in d.nodes.values() if n.cluster is None]
    for e in d.edges:
        out.append(f"  {_mid(e.tail)} -->|{_mq(_edge_text(e.labels))}| {_mid(e.head)}")
    kinds = {"state": [n.id for n in d.nodes.values() if not (n.context or n.any)],
             "context": [n.id for n in d.nodes.values() if n.context],
             "any": [n.id for n in d.nodes.values() if n.any]}
    for kind, ids in kinds.items():
        if ids:
            out.append(f"  class {','.join(_mid(i) for i in ids)} {kind}")
    for c in d.clusters.values():
        if c.context:
            out.append(f"  style {_mid(c.id)} fill:none,stroke:gray,stroke-dasharray:4 3")
    if marked is not None:
        out.append(f"  class {_mid(marked)} active")
    return "\n".join(out) + "\n"


# --- whole-machine text, for --stdout and for tests ------------------------------------------


def _checked_highlight(spec: MachineSpec, highlight: str | None) -> None:
    if highlight is not None:
        spec.state(highlight)  # KeyError for an unknown state


def dot_source(spec: MachineSpec, highlight: str | None = None) -> str:
    """The whole machine as one DOT graph."""
    _checked_highlight(spec, highlight)
    return to_dot(whole(spec), highlight)


def mermaid_source(spec: MachineSpec, highlight: str | None = None) -> str:
    """The whole machine as one Mermaid flowchart."""
    _checked_highlight(spec, highlight)
    return to_mermaid(whole(spec), highlight)


# --- rendering (graphviz, imported only when SVG or PNG is asked for) --------------------------


def _graphviz() -> Any:
    try:
        import graphviz  # optional, and slow to import: only SVG and PNG need it
    except ImportError:
        raise DiagramError(f"SVG and PNG need graphviz: {INSTALL_HINT}") from None
    return graphviz


def render(dot: str, fmt: str) -> bytes:
    """SVG or PNG bytes of a DOT text, made by graphviz's `dot`."""
    graphviz = _graphviz()
    try:
        return bytes(graphviz.Source(dot).pipe(format=fmt))
    except graphviz.ExecutableNotFound:
        raise DiagramError(f"SVG and PNG need graphviz's dot program: {INSTALL_HINT}") from None
    except graphviz.CalledProcessError as e:
        raise DiagramError(f"dot failed: {(e.stderr or b'').decode(errors='replace').strip()}")\
            from None


def write(name: str, formats: list[str], out: Path, highlight: str | None = None,
          one_piece: bool = False) -> list[Path]:
    """Write `<out>/<stem>.<fmt>` for each drawing of `name` and each format."""
    spec = load_spec(name)
    _checked_highlight(spec, highlight)
    if {"svg", "png"} & set(formats):
        _graphviz()  # say what is missing before anything is written
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for d in drawings(spec, one_piece):
        dot = to_dot(d, highlight)
        texts = {"dot": dot, "mmd": to_mermaid(d, highlight)}
        for fmt in formats:
            path = out / f"{d.stem}.{fmt}"
            if fmt in texts:
                path.write_text(texts[fmt], encoding="utf-8")
            else:
                path.write_bytes(render(dot, fmt))
            written.append(path)
    return written


# --- a live VBD: tapback's status file ---------------------------------------------------------


def default_status_file(control_dir: str | None = None, backend_kind: str = "vbd3") -> Path:
    """Where tapback keeps its status: `<control-dir>/tapback.<backend-kind>.status.json`."""
    return runtime.root_dir(control_dir) / f"tapback.{backend_kind}.status.json"


@dataclass(frozen=True)
class LiveVbd:
    """One VBD as a running tapback last reported it."""

    domid: int
    devid: int
    machine: str
    state: str
    published: int | None
    pid: int


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_live(status_file: Path, domid: int, devid: int) -> LiveVbd:
    """The VBD `domid/devid` as the tapback writing `status_file` reports it.

    Raises `DiagramError` (one line) when the file is missing or malformed, its tapback
    is not running, the VBD is not there, or its state is not one of its machine's.
    """
    try:
        text = status_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DiagramError(f"no tapback status file {status_file} (is tapback running? "
                           "--status-file names another)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DiagramError(f"cannot read {status_file}: {e}") from None
    try:
        status = json.loads(text)
    except json.JSONDecodeError as e:
        raise DiagramError(f"{status_file} is not a tapback status file: {e}") from None
    pid = _int(status.get("pid")) if isinstance(status, dict) else None
    vbds = status.get("vbds") if isinstance(status, dict) else None
    if pid is None or pid <= 0 or not isinstance(vbds, list):
        raise DiagramError(f"{status_file} is not a tapback status file: "
                           'expected {"pid": <int>, "vbds": [...]}')
    if not _pid_alive(pid):
        raise DiagramError(f"tapback {pid} of {status_file} is not running: the status is stale")
    found = [v for v in vbds if isinstance(v, dict)
             and _int(v.get("domid")) == domid and _int(v.get("devid")) == devid]
    if not found:
        have = sorted(f"{v.get('domid')}/{v.get('devid')}" for v in vbds if isinstance(v, dict))
        raise DiagramError(f"tapback {pid} has no VBD {domid}/{devid} "
                           f"(it has: {', '.join(have) or 'none'})")
    vbd = found[0]
    machine, state = vbd.get("machine"), vbd.get("state")
    if not isinstance(machine, str) or machine not in spec_names():
        raise DiagramError(f"{status_file}: VBD {domid}/{devid} runs an unknown machine "
                           f"{machine!r}")
    if not isinstance(state, str) or state not in load_spec(machine).leaves():
        raise DiagramError(f"{status_file}: VBD {domid}/{devid} is in {state!r}, "
                           f"not a state of {machine}")
    return LiveVbd(domid, devid, machine, state, _int(vbd.get("published")), pid)


def live_state(status_file: Path, domid: int, devid: int) -> str:
    """The state of VBD `domid/devid` in the running tapback that writes `status_file`."""
    return read_live(status_file, domid, devid).state


def _vbd_id(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected DOMID/DEVID (e.g. 1/51712), got {text!r}")
    return int(m.group(1)), int(m.group(2))


# --- the command -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="blktap3-diagram", description=doc.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["all"], help="machines, or 'all'")
    parser.add_argument("-f", "--formats", default="dot,svg,png,mmd",
                        help=f"comma-separated, from {', '.join(FORMATS)} (svg and png need "
                             "graphviz)")
    parser.add_argument("-o", "--out", type=cmdline.dir_to_create,
                        help="output directory (default: ./docs, unless a state is marked)")
    parser.add_argument("--whole", action="store_true",
                        help="one drawing per machine, even for one drawn by phases")
    mark = parser.add_mutually_exclusive_group()
    mark.add_argument("--highlight", metavar="STATE", help="mark this state")
    mark.add_argument("--live", metavar="DOMID/DEVID", type=_vbd_id,
                      help="mark the state a running tapback reports for this VBD")
    parser.add_argument("--status-file", type=Path, metavar="FILE",
                        help="tapback's status file (default: $BLKTAP_CONTROL_DIR or "
                             "/run/blktap-control, then tapback.vbd3.status.json)")
    parser.add_argument("--stdout", action="store_true",
                        help="print the whole machine instead (mmd if it is the only format, "
                             "else dot)")
    return parser


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    known = spec_names()
    names = known if args.names in ([], ["all"]) else args.names
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        parser.error(f"unknown format(s) {bad}")
    for name in names:
        if name not in known:
            parser.error(f"unknown machine {name!r}; known: {', '.join(known)}")
    if args.status_file is not None and args.live is None:
        parser.error("--status-file goes with --live")
    highlight = args.highlight
    if args.live is not None:
        vbd = read_live(args.status_file or default_status_file(), *args.live)
        if args.names in ([], ["all"]):
            names = [vbd.machine]
        if names != [vbd.machine]:
            raise DiagramError(f"VBD {vbd.domid}/{vbd.devid} runs {vbd.machine}, "
                               f"not {', '.join(names)}")
        highlight = vbd.state
        print(f"{vbd.machine} {vbd.domid}/{vbd.devid}: {vbd.state} (tapback {vbd.pid})",
              file=sys.stderr if args.stdout else sys.stdout)
    for name in names:
        if highlight is not None:
            try:
                load_spec(name).state(highlight)
            except KeyError:
                parser.error(f"{name} has no state {highlight!r}")
    if args.stdout:
        for name in names:
            spec = load_spec(name)
            text = (mermaid_source(spec, highlight) if formats == ["mmd"]
                    else dot_source(spec, highlight))
            sys.stdout.write(text)
        return 0
    if args.out is None and highlight is not None:
        parser.error("a marked drawing goes to -o DIR or --stdout (docs/ holds the unmarked)")
    out = args.out if args.out is not None else DEFAULT_OUT
    if out.exists() and not out.is_dir():
        raise DiagramError(f"cannot write into {out}: not a directory")
    for name in names:
        try:
            paths = write(name, formats, out, highlight, args.whole)
        except OSError as e:
            where = e.filename if e.filename is not None else out
            raise DiagramError(f"cannot write {where}: {e.strerror or e}") from None
        for path in paths:
            print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except (DiagramError, SpecError) as e:
        print(f"blktap3-diagram: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
