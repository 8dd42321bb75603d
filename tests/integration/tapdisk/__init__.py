"""Integration tests: real tapdisk processes driven by tap-ctl."""
