"""Tests of blktap3.tapdisk: VBD machine, control logic, server."""
