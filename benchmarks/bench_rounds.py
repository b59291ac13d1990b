"""Round benchmarks: samples/s of one PD update, fastdiff against the naive implementation.

One update = 2 teacher forwards, the target, the student forward and backward, gradient
clipping at 1.0 and an AdamW step, on a fixed batch (data drawing and the EMA are left out
of every provider alike). Providers, side by side for each U-Net:

* ``naive``: benchmarks/naive_pd.py (paper pseudo-code in eager float32, x-space target);
* ``fastdiff-default``: ``fastdiff.apps.profile.PDStep`` with fastdiff's device defaults
  (= what ``distill_round`` runs: eager, bf16 autocast on CUDA, float32 on CPU);
* ``fastdiff-{eager,compile}-{fp32,bf16}``: torch.compile of the student on/off (what
  ``distill_round(compile=True)`` does) × autocast; the explicit config equal to the
  default is not run twice;
* ``fastdiff-cl-{fp32,bf16}``: a candidate fix measured here: both U-Nets and z_t in
  channels_last memory format (oneDNN's preferred layout on CPU, cuDNN's for bf16).

Timing (DESIGN §5): the first selected case of a model builds every selected provider of
that model from the same weights and times them interleaved (A B C A B C ...) in this
process, each timing a few consecutive updates; every case then records its own provider's
``min_s``, ``median_s``, ``max_s``, ``spread`` (max/min), ``reps`` and the load average
before and after the whole measurement (pytest-benchmark's stats are those same repeats).

extra_info: ``samples_per_s`` (batch / median update), ``flops_per_update`` (counted once
with torch.utils.flop_counter on an eager fp32 update: teacher ×2 forward, student forward
and backward), ``model_TFLOPs`` and ``frac_matmul`` (fraction of the fp32 or bf16 matmul
ceiling, by the config's autocast), ``loss`` (first update from the same weights and batch,
for the equal-loss check against ``naive``), ``peak_mem_MiB`` with ``peak_mem_kind`` (CUDA:
max_memory_allocated growth of an update; CPU: peak live tensor bytes from the profiler).

On CPU, compiling a U-Net takes minutes per config on 2 cores: the default suite compiles
only the demo U-Net in bf16; FASTDIFF_BENCH_FULL=1 runs every compiled config.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common
from benchmarks.naive_pd import naive_update
from fastdiff.apps.profile import PDStep, build_pair, random_batch

STUDENT_STEPS = 32  # the student's step count N (a 64 -> 32 halving, the demo's first)


def _batch_size(model: str) -> int:
    if model == "demo":
        return 128  # the demo's batch
    return 128 if common.is_cuda() else 16


def _providers():
    default = "bf16" if common.is_cuda() and common.bf16_supported() else "fp32"
    out = ["naive", "fastdiff-default"]
    for comp in ("eager", "compile"):
        for amp in ("fp32", "bf16"):
            if amp == "bf16" and not common.bf16_supported():
                continue
            if comp == "eager" and amp == default:
                continue  # = fastdiff-default
            out.append(f"fastdiff-{comp}-{amp}")
    out += ["fastdiff-cl-fp32"] + (["fastdiff-cl-bf16"] if common.bf16_supported() else [])
    return out


def _cases():
    for model in ("demo", "large"):
        for provider in _providers():
            marks = []
            if model == "demo" and provider in ("naive", "fastdiff-default"):
                marks.append(pytest.mark.quick)
            # on CPU a U-Net compile takes minutes: the default suite keeps one compiled
            # config (demo, bf16) to stay under 10 minutes; FASTDIFF_BENCH_FULL=1 runs all
            slow = "compile" in provider and (model == "large" or provider.endswith("fp32"))
            if slow and not common.is_cuda() and not common.full_suite():
                marks.append(pytest.mark.skip(
                    reason="torch.compile of a U-Net takes minutes on CPU; "
                           "set FASTDIFF_BENCH_FULL=1"))
            yield pytest.param(model, provider, marks=marks, id=f"{model}-{provider}")


_FLOPS: dict = {}


def _count_flops(model: str, batch, warmup: int) -> int:
    """FLOPs of one eager fp32 update (teacher ×2, student fwd + bwd), counted once.

    The first time a model is seen, `warmup` more untimed updates follow: the first
    provider would otherwise pay the process's memory warm-up (the allocator growing its
    heap, page faults), measured at up to 20% of an update on the large U-Net on CPU."""
    key = (model, batch.z_t.shape[0])
    if key not in _FLOPS:
        teacher, student = build_pair(model, common.device())
        step = PDStep(teacher, student, student_steps=STUDENT_STEPS, autocast="fp32")
        with FlopCounterMode(display=False) as counter:
            step(batch)
        _FLOPS[key] = counter.get_total_flops()
        for _ in range(warmup):
            step(batch)
    return _FLOPS[key]


def _make_update(model: str, provider: str, batch):
    """(update callable, autocast name) for `provider`, from fresh identical weights."""
    teacher, student = build_pair(model, common.device())
    if provider == "naive":
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4, betas=(0.9, 0.99))
        cond = batch.cond

        def update():
            return naive_update(student, teacher, opt, batch.z_t, batch.t, STUDENT_STEPS, cond)

        return update, "fp32"
    if provider == "fastdiff-default":
        return PDStep(teacher, student, student_steps=STUDENT_STEPS), (
            "bf16" if common.is_cuda() and common.bf16_supported() else "fp32")
    _, comp, amp = provider.split("-")
    if comp == "cl":
        cl = torch.channels_last
        teacher.to(memory_format=cl)
        student.to(memory_format=cl)
        batch = copy.copy(batch)
        batch.z_t = batch.z_t.contiguous(memory_format=cl)
    step = PDStep(teacher, student, student_steps=STUDENT_STEPS, compile=comp == "compile",
                  autocast=amp)
    return (lambda: step(batch)), amp


_GROUPS: dict = {}


def _measure_group(model: str, providers: list, batch_size: int, quick: bool) -> dict:
    """Every selected provider of `model`, built from the same weights, timed interleaved
    (A B C A B C ...) in this process; {provider: figure}."""
    key = (model, batch_size, tuple(providers))
    if key in _GROUPS:
        return _GROUPS[key]
    _GROUPS.clear()  # one model's providers alive at a time (memory)
    teacher, _ = build_pair(model, common.device())
    batch = random_batch(teacher, batch_size, STUDENT_STEPS, seed=1, device=common.device())
    del teacher
    flops = _count_flops(model, batch, warmup=1 if quick else 4)
    updates, info = {}, {}
    for provider in providers:
        update, amp = _make_update(model, provider, batch)
        if isinstance(update, PDStep):
            update = (lambda step: lambda: step(batch))(update)
        first_loss = float(update())  # from the shared initial weights; compiles if asked
        update()
        updates[provider] = common.synced(update)
        info[provider] = {"autocast": amp, "loss": first_loss}
    reps = common.MIN_REPS if quick else (5 if model == "demo" else 3)
    figures = common.interleaved(updates, reps=reps, target_s=0.05 if quick else 0.2,
                                 warmup=0, max_iters=20)
    for provider, update in updates.items():
        peak, peak_kind = common.peak_memory(update)
        figures[provider] |= info[provider] | {"flops": flops, "peak_mem_MiB": peak,
                                               "peak_mem_kind": peak_kind}
    _GROUPS[key] = figures
    return figures


@pytest.mark.parametrize("model,provider", list(_cases()))
def bench_round(benchmark, record, quick, ceilings, request, model, provider):
    batch_size = 16 if quick else _batch_size(model)
    group = [p["provider"] for p in common.selected_params(request, "bench_round")
             if p["model"] == model]
    fig = _measure_group(model, group or [provider], batch_size, quick)[provider]
    common.feed_benchmark(benchmark, fig["times_s"])
    median = fig["median_s"]
    rate = fig["flops"] / median
    ceiling = ceilings.get(f"matmul_{fig['autocast']}_TFLOPs", ceilings["matmul_fp32_TFLOPs"])
    record(kind="round", model=model, provider=provider, batch=batch_size,
           autocast=fig["autocast"], size=f"{model} B={batch_size}",
           samples_per_s=batch_size / median, flops_per_update=fig["flops"],
           model_TFLOPs=rate / common.TFLOP, frac_matmul=rate / common.TFLOP / ceiling,
           loss=fig["loss"], peak_mem_MiB=fig["peak_mem_MiB"],
           peak_mem_kind=fig["peak_mem_kind"], group=group,
           **{k: fig[k] for k in _TIMING_KEYS})


_TIMING_KEYS = ("min_s", "median_s", "max_s", "spread", "reps", "iters", "loadavg_before",
                "loadavg_after")
