"""The handshake benchmark runs end to end and reports plausible figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_bench_handshake_small_run() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "blktap3.tools.bench_handshake", "--rounds", "3", "--vbds", "6",
         "--domains", "2", "--shared-tapdisks", "2", "--json"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    latency = result["latency"]["initialised_to_backend_connected_ms"]
    assert 0 < latency["median"] <= latency["p99"]
    up = result["bring_up"]
    assert up["vbds"] == 6 and up["tapdisks"] == 2 and up["seconds"] > 0
    # tapback's share is real work (reads, transactions) but bounded.
    assert 10 < up["xenstore_requests_per_vbd"]["tapback"] < 100
    # Every VBD was torn down (each one waited for its back-end's Closed), by real work.
    assert up["teardown_seconds"] > 0
    assert 0 < up["teardown_xenstore_requests_per_vbd"]["tapback"] < 100
    rss = up["tapback_rss_kib"]
    assert rss["before"] > 0 and rss["connected"] > 0
    assert rss["per_vbd"] == (rss["connected"] - rss["before"]) / 6
