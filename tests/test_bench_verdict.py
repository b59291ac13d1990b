"""The benchmark verdicts cannot lie (issue 14 item 7): providers are timed interleaved,
every figure carries min / median / spread and the load, and a target is MET or MISSED only
when every provider it compares has a tight spread; otherwise "noisy: rerun".

No real timing here: a fake clock and synthetic measurements.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common, quality, summary  # noqa: E402


class FakeClock:
    """per_call returns scripted seconds per provider (in call order) and calls fn."""

    def __init__(self, script: dict):
        self.script = {k: list(v) for k, v in script.items()}
        self.calls: list = []

    def sync(self):
        pass

    def per_call(self, fn, iters=1):
        name = fn()
        self.calls.append((name, iters))
        return self.script[name].pop(0)


def _providers(log: list):
    def make(name):
        def fn():
            log.append(name)
            return name
        return fn
    return {"A": make("A"), "B": make("B")}


def test_interleaved_runs_a_b_a_b_and_summarises():
    log: list = []
    clock = FakeClock({"A": [1.0, 1.1, 1.2], "B": [2.0, 5.0, 2.5]})
    figs = common.interleaved(_providers(log), reps=3, warmup=1, clock=clock)
    assert log[:2] == ["A", "B"]                      # warm-up, then timings
    # interleaved, the order turning each round (a drifting load favours neither)
    assert [name for name, _ in clock.calls] == ["A", "B", "B", "A", "A", "B"]
    a, b = figs["A"], figs["B"]
    assert a["min_s"] == 1.0 and a["median_s"] == 1.1 and a["max_s"] == 1.2
    assert a["spread"] == pytest.approx(1.2) and a["reps"] == 3
    assert b["spread"] == pytest.approx(2.5) and b["times_s"] == [2.0, 5.0, 2.5]
    for fig in figs.values():
        assert "loadavg_before" in fig and "loadavg_after" in fig
    assert common.trusted(a) and not common.trusted(b)


def test_interleaved_sizes_each_timing_to_the_target():
    log: list = []
    # one probe call each (0.01 s and 0.1 s), then 3 reps of each
    clock = FakeClock({"A": [0.01, 0.01, 0.01, 0.01], "B": [0.1, 0.1, 0.1, 0.1]})
    figs = common.interleaved(_providers(log), reps=3, warmup=0, target_s=0.1, clock=clock)
    assert figs["A"]["iters"] == 10 and figs["B"]["iters"] == 1


def _fig(times):
    return common.summarise(times)


def test_verdict_noisy_met_missed():
    tight, noisy = _fig([1.0, 1.05, 1.1]), _fig([1.0, 3.0, 2.0])
    assert common.verdict({"a": tight, "b": tight}, True) == "MET"
    assert common.verdict({"a": tight, "b": tight}, False) == "MISSED"
    v = common.verdict({"a": tight, "b": noisy}, True)
    assert v.startswith("noisy: rerun") and "b spread 3.00" in v and "MET" not in v
    # two repeats cannot show their own noise; a spread of exactly 1.3 is not "< 1.3"
    assert common.verdict({"a": _fig([1.0, 1.0])}, True).startswith("noisy: rerun")
    assert common.verdict({"a": _fig([1.0, 1.3, 1.1])}, True).startswith("noisy: rerun")
    assert common.verdict({"a": _fig([])}, True).startswith("noisy: rerun")


def _bench(info: dict) -> dict:
    return {"name": "x", "stats": {"min": info["min_s"]}, "extra_info": info}


def _round(provider: str, times: list, loss: float = 0.5) -> dict:
    fig = common.summarise(times)
    return _bench(fig | {"kind": "round", "model": "demo", "provider": provider,
                         "size": "demo B=128", "samples_per_s": 128 / fig["median_s"],
                         "frac_matmul": 0.1, "loss": loss, "loadavg_before": [0.1],
                         "loadavg_after": [0.2]})


def _data(*benchmarks) -> dict:
    return {"benchmarks": list(benchmarks), "machine_info": {}}


def _round_target(data) -> str:
    lines = [x for x in summary.targets(data) if "demo PD update" in x]
    assert len(lines) == 1, lines
    return lines[0]


def test_summary_says_noisy_for_a_noisy_run_that_looks_like_a_win():
    """The issue's case: the naive round's median 3x its minimum, fastdiff apparently 7x:
    the summary must not print MET."""
    data = _data(_round("naive", [0.05, 0.15, 0.12]), _round("fastdiff-default", [0.02] * 3))
    line = _round_target(data)
    assert "noisy: rerun" in line and "MET" not in line
    assert "noisy: rerun" in summary.format_table(data)


def test_summary_met_and_missed_on_tight_runs():
    met = _data(_round("naive", [0.10, 0.101, 0.102]),
                _round("fastdiff-default", [0.05, 0.051, 0.052]))
    assert _round_target(met).endswith(": MET")
    slow = _data(_round("naive", [0.10, 0.101, 0.102]),
                 _round("fastdiff-default", [0.08, 0.081, 0.082]))
    assert _round_target(slow).endswith(": MISSED")
    unequal = _data(_round("naive", [0.10, 0.101, 0.102]),
                    _round("fastdiff-default", [0.05, 0.051, 0.052], loss=0.6))
    assert _round_target(unequal).endswith(": MISSED")
    # the ratio is of medians
    row = [r for r in summary.rows(met) if r["provider"] == "fastdiff-default"][0]
    assert row["vs_base"] == pytest.approx(0.101 / 0.051)


def _kernel(provider: str, times: list) -> dict:
    fig = common.summarise(times)
    return _bench(fig | {"kind": "kernel", "op": "fused_pd_loss_fwdbwd", "size": "1M",
                         "dtype": "fp32", "provider": provider, "GBps": 1.0,
                         "frac_copy": 0.1})


def test_kernel_target_judges_all_three_providers():
    tight = _data(_kernel("fastdiff", [1.0, 1.01, 1.02]), _kernel("eager", [4.0, 4.1, 4.2]),
                  _kernel("compile", [1.5, 1.5, 1.5]))
    line = [x for x in summary.targets(tight) if x.startswith("  fused_pd_loss")]
    assert line and line[0].endswith(": MET")
    noisy = _data(_kernel("fastdiff", [1.0, 1.01, 1.02]), _kernel("eager", [4.0, 4.1, 4.2]),
                  _kernel("compile", [1.5, 3.0, 1.5]))
    line = [x for x in summary.targets(noisy) if x.startswith("  fused_pd_loss")]
    assert "noisy: rerun" in line[0] and "compile spread" in line[0]


def _curve(points):
    """[(updates, seconds, error)]"""
    return list(points)


def test_time_to_quality_figures_and_verdict():
    naive = [_curve([(100, 10.0, 0.30), (200, 20.0, 0.20), (300, 30.0, 0.10)])] * 3
    # fastdiff reaches 0.10 at 12 s (and ends at 0.09): 2.5x
    fast = [_curve([(100, 6.0, 0.20), (200, 12.0 + d, 0.10), (300, 18.0, 0.09)])
            for d in (0.0, 0.2, 0.4)]
    figs = quality.figures_from_curves({"naive": naive, "fastdiff-default": fast})
    assert figs["naive"]["median_s"] == 30.0
    assert figs["fastdiff-default"]["median_s"] == pytest.approx(12.2)
    assert figs["fastdiff-default"]["reached"]
    assert figs["fastdiff-default"]["error_ratio"] == pytest.approx(0.9)
    assert quality.verdict(figs) == "MET"
    # never reaches the plain loop's final error: MISSED, however fast it is
    never = [_curve([(100, 2.0, 0.3), (300, 6.0, 0.105)])] * 3
    figs = quality.figures_from_curves({"naive": naive, "fastdiff-default": never})
    assert not figs["fastdiff-default"]["reached"]
    assert quality.verdict(figs) == "MISSED"
    # a noisy naive run: no verdict
    noisy_naive = [_curve([(300, s, 0.10)]) for s in (30.0, 60.0, 45.0)]
    figs = quality.figures_from_curves({"naive": noisy_naive, "fastdiff-default": fast})
    assert quality.verdict(figs).startswith("noisy: rerun")
    # a lever tried on the plain loop is judged the same way, on its own name
    figs = quality.figures_from_curves({"naive": naive, "fastdiff-default": never,
                                        "naive+reuse4": fast})
    assert quality.verdict(figs, "naive+reuse4") == "MET"
    assert quality.verdict(figs) == "MISSED"


def test_summary_time_to_quality_row():
    naive = [_curve([(300, 30.0 + d, 0.10)]) for d in (0.0, 0.1, 0.2)]
    fast = [_curve([(150, 10.0 + d, 0.10), (300, 20.0, 0.1)]) for d in (0.0, 0.1, 0.2)]
    figs = quality.figures_from_curves({"naive": naive, "fastdiff-default": fast})
    recs = [_bench({k: figs[p][k] for k in ("min_s", "median_s", "max_s", "spread", "reps",
                                            "loadavg_before", "loadavg_after")}
                   | {"kind": "quality", "model": "demo", "provider": p, "size": "300",
                      "reached": figs[p]["reached"], "error_ratio": figs[p]["error_ratio"]})
            for p in quality.PROVIDERS]
    lines = [x for x in summary.targets(_data(*recs)) if "time-to-quality" in x]
    # medians 30.1 s and 10.1 s
    assert len(lines) == 1 and lines[0].endswith(": MET") and "2.98x naive" in lines[0]
