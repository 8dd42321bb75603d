"""`blktap3-fsm`: check the machine specs and print their xenbus tables.

    blktap3-fsm list              the machines and their titles
    blktap3-fsm check [NAME...]   schema, reachability, ways out, bound callbacks and the
                                  front-end-state table of the back-end; exit 1 on a problem
    blktap3-fsm table NAME        the xenbus table of one machine
"""

from __future__ import annotations

import argparse
import sys

from blktap3.fsm.checks import REQUIRED_TABLES, check_spec, render_table
from blktap3.fsm.errors import SpecError
from blktap3.fsm.registry import MACHINE_CLASSES
from blktap3.fsm.spec import load_spec, spec_names

# machines whose triggers include the other end's xenbus states
TABLE_PREFIXES = {**REQUIRED_TABLES, "frontend_vbd": "backend_"}


def check(names: list[str]) -> int:
    """Check the named specs (all when empty); print a report; 1 if any problem."""
    failed = 0
    for name in names or spec_names():
        try:
            spec = load_spec(name)
            problems = check_spec(spec, MACHINE_CLASSES.get(name))
            if name not in MACHINE_CLASSES:
                problems.append("no machine class runs this spec (blktap3.fsm.registry)")
        except SpecError as e:
            problems = [str(e)]
        if name in TABLE_PREFIXES and not problems:
            print(f"{name}: {TABLE_PREFIXES[name]}<state> events, by state")
            print(render_table(load_spec(name), TABLE_PREFIXES[name]))
        print(f"{name}: {f'{len(problems)} problem(s)' if problems else 'ok'}")
        for problem in problems:
            print(f"  - {problem}")
        failed += bool(problems)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blktap3-fsm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="list the machines")
    check_parser = sub.add_parser("check", help="check specs (all by default); exit 1 when "
                                  "one has a problem")
    check_parser.add_argument("names", nargs="*", help="machines (default: all)")
    table = sub.add_parser("table", help="print a machine's xenbus table")
    table.add_argument("name", choices=sorted(TABLE_PREFIXES), help="the machine")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        for name in spec_names():
            print(f"{name:16} {load_spec(name).title}")
        return 0
    if args.command == "table":
        print(render_table(load_spec(args.name), TABLE_PREFIXES[args.name]))
        return 0
    return check(args.names)


if __name__ == "__main__":
    sys.exit(main())
