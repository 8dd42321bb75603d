"""The conformance harness: front-end personalities and scenarios as data, any back-end.

    scenario.py   the data (specs/conformance/): personalities, scenarios, steps, checked
    guest.py      the scripted guest: a domain's blkfront doing exactly what a step says
    backends.py   the back-end under test as a plug: ours, or a test double (with faults)
    runner.py     one scenario on a fresh simulated host: a verdict for every step
    coverage.py   which rows of the back-end machine the scenarios reached
    report.py     the verdict table and the JSON
    cli.py        `blktap3-conformance`
"""
