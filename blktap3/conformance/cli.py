"""`blktap3-conformance`: run the conformance scenarios against a back-end, print verdicts.

    blktap3-conformance [--xenstored c|ocaml] [--backend ours|blktap|double|double:<fault>
                        [,...]] [--prefix DIR] [--only NAME ...] [--json FILE]
                        [--timeout S] [--list]
    blktap3-conformance --random N [--seed S]    (random front-end walks)
    blktap3-conformance --model N [--seed S] [--baseline FILE]
                                                 (walks over the machines in memory)
    blktap3-conformance --self-test

`--backend ours,blktap` runs the scenarios against each back-end and prints them side by
side (one verdict column each), then each back-end's differences from the specs.
`blktap` is blktap's own tapback and tapdisk from the build installed under `--prefix`
(default `$BLKTAP_BUILD`); it runs in a private mount namespace (`blktap.py`).

Exit status 0 only when every scenario passes (an expected failure, marked in its file
with the reason, counts as passing; an unexpected pass does not: remove the mark).
`--self-test` runs the deliberately broken back-ends (`DoubleBackend` faults) and exits
0 only when the clean double passes and every broken one is caught.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import structlog

from .backends import FAULTS, Backend, DoubleBackend, make_backend
from .blktap import PREFIX_ENV, BlktapError, in_namespace, private_mounts, reexec_in_namespace
from .coverage import Coverage, coverage
from .model import model_walks, unreached_by_scenarios
from .report import as_json, coverage_text, side_by_side, table
from .runner import ScenarioResult, run_scenario
from .scenario import Personality, Scenario, ScenarioError, load_personalities, load_scenarios
from .walks import walks

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# For each broken back-end, the scenarios that must catch it (each short).
SELF_TEST: dict[str, tuple[str, ...]] = {
    "skips-initwait": ("linux-connect-io-detach",),
    "forgets-sectors": ("linux-connect-io-detach",),
    "guest-writable-keys": ("linux-connect-io-detach",),
    "no-reconnect": ("linux-suspend-resume",),
    "publishes-initialised": ("netbsd-connect",),
    "no-error-node": ("hostile-garbage-ring-ref",),
    "leaks-tapdisk": ("hostile-remove-own-state",),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="blktap3-conformance", description=__doc__.split("\n")[0])
    ap.add_argument("--xenstored", choices=["c", "ocaml"], default="c")
    ap.add_argument("--backend", default="ours",
                    help="the back-ends to judge, comma-separated (side by side): ours, "
                         f"blktap, double, or double:<fault> ({', '.join(FAULTS)})")
    ap.add_argument("--prefix", default=os.environ.get(PREFIX_ENV), metavar="DIR",
                    help=f"with --backend blktap: the install prefix of a blktap build "
                         f"(bin/tapback, sbin/tap-ctl, libexec/tapdisk; default ${PREFIX_ENV})")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run the scenarios whose name matches (glob; repeatable)")
    ap.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': stdout)")
    ap.add_argument("--timeout", type=float, default=10.0,
                    help="seconds a step's expectations may take (default 10)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--random", type=int, default=0, metavar="N",
                    help="run N random front-end walks instead of the scenarios")
    ap.add_argument("--seed", type=int, default=1, help="the first walk's seed (default 1)")
    ap.add_argument("--model", type=int, default=0, metavar="N",
                    help="run N hypothesis walks over the front-end and back-end machines "
                         "wired in memory (seconds, no host) and report their coverage")
    ap.add_argument("--baseline", metavar="FILE",
                    help="with --model: the --json of a scenario run; list the rows the "
                         "walks took that its scenarios missed")
    ap.add_argument("--self-test", action="store_true",
                    help="check that broken back-ends are caught")
    return ap


def _select(scenarios: list[Scenario], only: Sequence[str]) -> list[Scenario]:
    if not only:
        return scenarios
    return [s for s in scenarios if any(fnmatch.fnmatch(s.name, o) for o in only)]


def run_all(scenarios: Sequence[Scenario], personalities: dict[str, Personality],
            backend: Backend, xenstored: str, timeout: float,
            progress: bool = True) -> list[ScenarioResult]:
    results = []
    workdir = Path(tempfile.mkdtemp(prefix="b3c-", dir="/tmp"))
    try:
        for i, scenario in enumerate(scenarios):
            where = workdir / str(i)
            where.mkdir()
            result = run_scenario(scenario, personalities, backend, workdir=where,
                                  xenstored=xenstored,  # type: ignore[arg-type]
                                  timeout=timeout)
            if progress:
                print(f"  {result.verdict:<5} {scenario.name} [{backend.name}]", file=sys.stderr,
                      flush=True)
            results.append(result)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _passed(result: ScenarioResult) -> bool:
    return result.verdict == "pass"  # a double is judged plainly (marks are for ours)


def self_test(personalities: dict[str, Personality], scenarios: list[Scenario],
              xenstored: str, timeout: float) -> int:
    by_name = {s.name: s for s in scenarios}
    needed = sorted({n for names in SELF_TEST.values() for n in names})
    ok = True
    print("self-test: the clean double must pass what catches the broken ones")
    clean = run_all([by_name[n] for n in needed], personalities, DoubleBackend(), xenstored,
                    timeout, progress=False)
    print(table(clean))
    ok &= all(_passed(r) for r in clean)
    for fault, names in SELF_TEST.items():
        results = run_all([by_name[n] for n in names], personalities, DoubleBackend(fault),
                          xenstored, timeout, progress=False)
        caught = [r for r in results if not _passed(r)]
        print(f"\n{'caught' if caught else 'MISSED'}: double:{fault} ({FAULTS[fault]})")
        print(table(results))
        ok &= bool(caught)
    print(f"\nself-test {'passed' if ok else 'FAILED'}")
    return EXIT_OK if ok else EXIT_FAILED


def model_main(count: int, first_seed: int, baseline_path: str | None,
               ap: argparse.ArgumentParser) -> int:
    try:
        baseline = json.loads(Path(baseline_path).read_text()) if baseline_path else None
    except (OSError, ValueError) as e:
        print(f"blktap3-conformance: --baseline: {e}", file=sys.stderr)
        ap.print_usage(sys.stderr)
        return EXIT_USAGE
    if count < 0:
        print("blktap3-conformance: --model takes a count >= 0", file=sys.stderr)
        ap.print_usage(sys.stderr)
        return EXIT_USAGE
    report = model_walks(count, first_seed)
    print(f"{report.walks} model walks from seed {first_seed}: "
          f"{'FAILED: ' + report.failure if report.failure else 'every rule held'}")
    for cov in report.coverage().values():
        print()
        print(coverage_text(cov, by="walk"))
        if baseline is not None:
            found = unreached_by_scenarios(cov, baseline)
            print(f"  rows walks took that the baseline's scenarios missed: {len(found)}")
            print("\n".join(f"    {d}" for d in found))
    return EXIT_FAILED if report.failure else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    try:
        personalities = load_personalities()
        scenarios = load_scenarios(personalities)
        specs = [b.strip() for b in args.backend.split(",")]
        if len(set(specs)) != len(specs) or "" in specs:
            raise ValueError(f"--backend {args.backend!r}: each back-end once")
        backends = [make_backend(spec, args.prefix) for spec in specs]
    except (ScenarioError, ValueError, BlktapError) as e:
        print(f"blktap3-conformance: {e}", file=sys.stderr)
        ap.print_usage(sys.stderr)
        return EXIT_USAGE
    if args.self_test:
        return self_test(personalities, scenarios, args.xenstored, args.timeout)
    if args.model:
        return model_main(args.model, args.seed, args.baseline, ap)
    if args.random < 0:
        print("blktap3-conformance: --random takes a count >= 0", file=sys.stderr)
        ap.print_usage(sys.stderr)
        return EXIT_USAGE
    chosen = walks(args.random, args.seed) if args.random else _select(scenarios, args.only)
    if not chosen:
        print(f"blktap3-conformance: no scenario matches {args.only}", file=sys.stderr)
        ap.print_usage(sys.stderr)
        return EXIT_USAGE
    if args.list:
        for s in chosen:
            mark = f"  [expected to fail: {s.xfail}]" if s.xfail else ""
            print(f"{s.name:<36} {s.personality:<16} {s.kind:<9} {s.doc}{mark}")
        return EXIT_OK
    if "blktap" in specs and not in_namespace():
        try:
            return reexec_in_namespace(argv)
        except BlktapError as e:
            print(f"blktap3-conformance: {e}", file=sys.stderr)
            return EXIT_USAGE
    if in_namespace():
        private_mounts()
    runs = {b.name: run_all(chosen, personalities, b, args.xenstored, args.timeout)
            for b in backends}
    covs = {name: _coverages(results) for name, results in runs.items()}
    everything = [r for results in runs.values() for r in results]
    if len(runs) > 1:
        print(side_by_side(runs))
    else:
        print(table(everything))
    for name, machine_covs in covs.items():
        for cov in machine_covs:
            print()
            print(coverage_text(cov) if len(runs) == 1 else f"[{name}] {coverage_text(cov)}")
    if args.json:
        report = as_json(everything, covs[backends[0].name])
        if len(runs) > 1:
            report["backends"] = {name: {"ok": all(r.ok for r in runs[name]),
                                         "coverage": {c.machine: c.percent for c in cs}}
                                  for name, cs in covs.items()}
        text = json.dumps(report, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return EXIT_OK if all(r.ok for r in everything) else EXIT_FAILED


def _coverages(results: Sequence[ScenarioResult]) -> list[Coverage]:
    """The back-end's machine when it logs one (ours); the front-end machine always."""
    lines = [line for r in results for line in r.coverage_lines]
    fe_lines = [line for r in results for line in r.frontend_lines]
    return ([coverage(lines)] if lines else []) + [coverage(fe_lines, "frontend_vbd")]


if __name__ == "__main__":
    sys.exit(main())
