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


def test_stdlib_corpus_is_text_of_the_asked_size_and_the_same_each_time(tmp_path):
    from fp8_tracking import stdlib_text

    first = stdlib_text(tmp_path / "a.txt", 0.5).read_bytes()
    assert 0.5e6 <= len(first) < 0.5e6 + 2e6  # whole files, stopping once the budget is spent
    assert stdlib_text(tmp_path / "b.txt", 0.5).read_bytes() == first
    assert b"def " in first


def test_the_kept_results_say_what_their_losses_say():
    """Each FP8 tracking result in benchmarks/results (quoted in docs/benchmarks.md): its verdict
    is the one its own recorded losses give."""
    import json

    results = sorted((Path(__file__).resolve().parent.parent / "benchmarks" / "results").glob("fp8_tracking_*.json"))
    assert results
    for path in results:
        kept = json.loads(path.read_text())
        verdict = report(kept["losses"])
        assert verdict["tracks"] == kept["tracks"], path.name
        assert abs(verdict["relative_difference"] - kept["relative_difference"]) < 1e-12, path.name
