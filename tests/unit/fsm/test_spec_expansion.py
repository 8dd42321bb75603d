"""Phases only change how a spec reads: the expanded transition table stays the same.

`expanded_tables.json` holds, for every shipped spec, the table the loader produced
before phases existed (each row: trigger, sorted sources, dest, conditions, unless,
before, after, and a refusing row's errno name; each ignore: trigger, sorted sources), in
spec order, which is the order the machine tries them in; and a machine whose triggers
declare an errno, those ("errnos": trigger -> name).  Regenerate it only when a row
really changes, from the specs that change it:
python -m tests.unit.fsm.test_spec_expansion > tests/unit/fsm/expanded_tables.json
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from blktap3.fsm.spec import MachineSpec, load_spec, spec_names

FIXTURE = Path(__file__).with_name("expanded_tables.json")


def expanded_table(spec: MachineSpec) -> dict[str, Any]:
    rows: list[list[Any]] = []
    ignores: list[list[Any]] = []
    for t in spec.transitions:
        if t.ignored:
            ignores.append([t.trigger, sorted(t.sources)])
        else:
            answer = [errno.errorcode[t.errno]] if t.errno is not None else []
            rows.append([t.trigger, sorted(t.sources), t.dest, list(t.conditions),
                         list(t.unless), list(t.before), list(t.after), *answer])
    table: dict[str, Any] = {"transitions": rows, "ignores": ignores}
    errnos = {n: errno.errorcode[t.errno] for n, t in spec.triggers.items()
              if t.errno is not None}
    if errnos:
        table["errnos"] = errnos
    return table


def all_tables() -> dict[str, dict[str, Any]]:
    return {name: expanded_table(load_spec(name)) for name in spec_names()}


def test_every_shipped_spec_has_a_pinned_table() -> None:
    assert sorted(json.loads(FIXTURE.read_text())) == spec_names()


@pytest.mark.parametrize("name", spec_names())
def test_expanded_table_is_the_pinned_one(name: str) -> None:
    pinned = json.loads(FIXTURE.read_text())[name]
    table = expanded_table(load_spec(name))
    # row by row first, so that a failure names the row
    for i, (got, want) in enumerate(zip(table["transitions"], pinned["transitions"],
                                        strict=False)):
        assert got == want, f"{name}: transitions[{i}]"
    assert table == pinned


def dump(tables: dict[str, dict[str, Any]]) -> str:
    """JSON with one row per line, so that a changed row is a one-line diff."""
    out = ["{"]
    for i, (name, table) in enumerate(tables.items()):
        out.append(f" {json.dumps(name)}: {{")
        for j, (key, rows) in enumerate(table.items()):
            comma = "," if j < len(table) - 1 else ""
            if isinstance(rows, dict):
                out.append(f"  {json.dumps(key)}: {json.dumps(rows)}{comma}")
                continue
            out.append(f"  {json.dumps(key)}: [")
            out += [f"   {json.dumps(r)}" + ("," if k < len(rows) - 1 else "")
                    for k, r in enumerate(rows)]
            out.append("  ]" + comma)
        out.append(" }" + ("," if i < len(tables) - 1 else ""))
    return "\n".join([*out, "}"]) + "\n"


if __name__ == "__main__":
    sys.stdout.write(dump(all_tables()))
