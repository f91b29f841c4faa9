"""tests/bench/bench_l4.py: how several rounds of the L4 benchmark are combined into one table."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_l4 import _median, median_of_rounds, ratios_per_round, summarize


def _round(nm_bulk: float, st_bulk: float, nm_rps: float, st_rps: float) -> dict[str, dict[str, Any]]:
    def mode(bulk: float, rps: float) -> dict[str, Any]:
        return {
            "mode": "x",
            "bulk_1": {"gbit_s": bulk, "cpu_s_per_gb": 10 / bulk},
            "bulk_8": {"gbit_s": bulk + 1},
            "sat_keepalive": {"rps": rps, "p50_ms": 1.0},
            "sat_close": {"rps": rps / 10},
        }

    return {"nodemesh": mode(nm_bulk, nm_rps), "stunnel": mode(st_bulk, st_rps)}


ROUNDS = [_round(6.0, 5.0, 30e3, 20e3), _round(4.0, 5.0, 20e3, 21e3), _round(7.0, 8.0, 25e3, 20e3)]


def test_each_step_comes_whole_from_its_median_round() -> None:
    merged = median_of_rounds(ROUNDS)
    # nodemesh bulk_1 over the rounds: 6, 4, 7 -> the median is round 1's 6.0, with its own CPU figure
    assert merged["nodemesh"]["bulk_1"] == ROUNDS[0]["nodemesh"]["bulk_1"]
    assert merged["nodemesh"]["bulk_1"]["cpu_s_per_gb"] == 10 / 6.0
    assert merged["nodemesh"]["sat_keepalive"]["rps"] == 25e3  # round 3's
    assert merged["stunnel"]["bulk_1"]["gbit_s"] == 5.0
    assert merged["nodemesh"]["mode"] == "x"  # what is not a step is kept


def test_an_even_count_takes_the_lower_middle_and_missing_steps_stay_missing() -> None:
    two = ROUNDS[:2]
    assert median_of_rounds(two)["nodemesh"]["bulk_1"]["gbit_s"] == 4.0
    assert "fixed_close" not in median_of_rounds(two)["nodemesh"]
    assert median_of_rounds([ROUNDS[0]]) == ROUNDS[0]


def test_ratios_are_taken_per_round_and_their_median_is_the_summary() -> None:
    per_round = ratios_per_round(ROUNDS)
    assert per_round["bulk_1"] == [1.2, 0.8, 0.88]
    assert per_round["sat_keepalive"] == [1.5, 0.95, 1.25]
    summary = summarize(median_of_rounds(ROUNDS), ROUNDS)
    assert summary["nodemesh_vs_stunnel"]["bulk_1"] == 0.88
    assert summary["nodemesh_vs_stunnel"]["sat_keepalive"] == 1.25
    assert summary["nodemesh_vs_stunnel_per_round"] == per_round
    assert summary["aims"]["throughput_ge_stunnel"] is False
    assert summary["aims"]["rps_ge_stunnel"] is True


def test_one_round_keeps_the_plain_ratio() -> None:
    summary = summarize(ROUNDS[0], [ROUNDS[0]])
    assert summary["nodemesh_vs_stunnel"]["bulk_1"] == 1.2
    assert "nodemesh_vs_stunnel_per_round" not in summary


def test_median_of_an_even_count_and_of_unknowns() -> None:
    assert _median([1.0, None, 3.0, 2.0, 4.0]) == 2.5
    assert _median([0.9]) == 0.9
    assert _median([None, None]) is None
