"""Time-to-quality benchmark (benchmarks/quality.py): wall time until the held-out PD error
reaches the plain eager loop's final value, naive against fastdiff's defaults, on the demo
U-Net and digits. Both providers come from one interleaved measurement (naive, fastdiff,
naive, fastdiff, ...); each case records its provider's figure. Not in the quick subset: a
300-update round at batch 128 takes tens of seconds on a CPU thread, times 2 x reps.
"""

from __future__ import annotations

import os

import pytest

from benchmarks import common, quality

_RESULT: dict = {}
UPDATES = int(os.environ.get("FASTDIFF_BENCH_TTQ_UPDATES", "300"))
BATCH = 128


@pytest.mark.parametrize("provider", quality.PROVIDERS)
def bench_time_to_quality(benchmark, record, provider):
    if not _RESULT:
        teacher, data, name = quality.demo_teacher_and_data()
        _RESULT.update(quality.time_to_quality(teacher, data, reps=common.MIN_REPS,
                                               updates=UPDATES, batch_size=BATCH),
                       teacher=name)
    fig = _RESULT[provider]
    common.feed_benchmark(benchmark, fig["times_s"])
    record(kind="quality", model="demo", provider=provider, teacher=_RESULT["teacher"],
           size=f"{UPDATES} upd B={BATCH}", reached=fig["reached"],
           error_ratio=fig["error_ratio"], final_error=fig["final_error"],
           round_median_s=fig["round_s"]["median_s"], round_spread=fig["round_s"]["spread"],
           **{k: fig[k] for k in ("min_s", "median_s", "max_s", "spread", "reps",
                                  "loadavg_before", "loadavg_after")})
