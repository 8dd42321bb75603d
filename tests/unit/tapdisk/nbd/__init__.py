"""Tests of the tapdisk NBD export: codec, image backend, server."""
