"""Machine coverage: logged steps of the back-end machine map to the rows of its spec."""

from __future__ import annotations

from blktap3.conformance.coverage import coverage, covered_rows, describe, rows_of
from blktap3.fsm.spec import load_spec


def test_a_logged_step_covers_the_row_that_takes_it() -> None:
    rows = rows_of(load_spec("backend_vbd"))
    row = next(r for r in rows if r.dest is not None and r.dest not in r.sources)
    line = {"event": "step", "trigger": row.trigger, "source": row.sources[0],
            "dest": row.dest}
    hit = covered_rows(rows, [line])
    assert rows.index(row) in hit
    # and no row of another trigger
    assert all(rows[i].trigger == row.trigger for i in hit)


def test_an_internal_row_is_covered_by_a_no_step_line() -> None:
    rows = rows_of(load_spec("backend_vbd"))
    row = next(r for r in rows if r.dest is None)
    hit = covered_rows(rows, [{"event": "no step", "trigger": row.trigger,
                               "state": row.sources[0]}])
    assert rows.index(row) in hit


def test_nothing_logged_covers_nothing_and_lists_every_row() -> None:
    cov = coverage([])
    assert cov.percent == 0.0 and len(cov.missed()) == len(cov.rows) > 0
    assert cov.as_dict()["missed"][0] == describe(cov.rows[0])


def test_a_step_the_spec_does_not_have_covers_nothing() -> None:
    cov = coverage([{"event": "step", "trigger": "frontend_connected", "source": "removed",
                     "dest": "connected"}])
    assert not cov.covered
