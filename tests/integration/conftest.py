"""Integration tests run real processes (xenstored, oxenstored, tapdisk, tapback) on the
simulated host: the fixtures (`host`, parametrized by `xenstored_kind`; `xs`; `tapback`;
`machine`; `run_dir`) are shared by every test directory, in `tests/support/fixtures.py`.
"""
