"""``benchmarks/fp8_tracking.py``'s verdict (its GPU runs are in benchmarks/results): the tail is
the last fifth of the steps, compared with the FP8 unit test's 5% tolerance."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from fp8_tracking import report  # noqa: E402


def test_tail_within_five_percent_tracks():
    bf16 = [10.0] * 8 + [2.0, 2.0]
    assert report({"bf16": bf16, "fp8": [10.0] * 8 + [2.09, 2.09]})["tracks"]
    verdict = report({"bf16": bf16, "fp8": [10.0] * 8 + [2.11, 2.11]})
    assert not verdict["tracks"] and abs(verdict["relative_difference"] - 0.055) < 1e-9
    assert verdict["bf16_learned"] == 8.0
