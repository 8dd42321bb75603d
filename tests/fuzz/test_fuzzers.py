"""A short run of every fuzz target on its seed corpus (long runs: run_fuzzers.py)."""

from __future__ import annotations

import pytest

from blktap3.ctl import protocol

from . import run_fuzzers


@pytest.mark.parametrize("target", run_fuzzers.TARGETS)
def test_the_fuzz_target_finds_nothing_in_a_short_run(
        target: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_fuzzers.main(["--seconds", "3", target]) == 0, capsys.readouterr().out


def test_the_seed_found_by_the_ctl_fuzzer_is_refused_not_mangled() -> None:
    """A char[256] without its NUL decoded as a 256-byte string that could not be sent
    again (and, cut to 255, would name another path)."""
    raw = (run_fuzzers.CORPUS / "ctl" / "regression-unterminated-string").read_bytes()
    with pytest.raises(protocol.ProtocolError, match="no NUL"):
        protocol.decode(raw)
