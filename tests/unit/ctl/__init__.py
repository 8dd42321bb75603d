"""Tests of blktap3.ctl: codec, client library, tap-ctl."""
