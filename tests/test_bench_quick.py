"""``make bench QUICK=1`` runs every scenario of the benchmark on tiny sizes, so the benchmark never rots.

It checks that each scenario ran and reported, not how fast anything was: speed targets live in
BENCHMARKS.md, measured by ``make bench``, never in the tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO


def test_quick_benchmark_runs_every_scenario():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench/run.py"), "--quick", "--no-write"],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert "did not complete" not in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    rows = re.findall(r"^\| (\d+[a-z]?'?) \|", result.stdout, flags=re.M)
    for scenario in ("1a", "1b", "1c", "2a", "2b", "3", "4a", "4b", "5a", "5b", "6", "7", "8a", "8b", "8c", "9",
                     "11a", "11b", "11c", "11d", "11e", "11f"):
        assert scenario in rows, f"scenario {scenario} missing from:\n{result.stdout[-3000:]}"
