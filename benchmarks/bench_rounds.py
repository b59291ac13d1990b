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

extra_info: ``samples_per_s`` (batch / fastest update), ``flops_per_update`` (counted once
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


@pytest.mark.parametrize("model,provider", list(_cases()))
def bench_round(benchmark, record, quick, ceilings, model, provider):
    batch_size = 16 if quick else _batch_size(model)
    teacher, _ = build_pair(model, common.device())
    batch = random_batch(teacher, batch_size, STUDENT_STEPS, seed=1, device=common.device())
    del teacher
    flops = _count_flops(model, batch, warmup=1 if quick else 4)
    update, amp = _make_update(model, provider, batch)
    if isinstance(update, PDStep):
        step = update
        update = lambda: step(batch)  # noqa: E731
    first_loss = float(update())  # from the shared initial weights; compiles if asked
    update()
    common.run_pedantic(benchmark, update, quick=quick, round_s=0.0,
                        rounds=2 if quick else (5 if model == "demo" else 3))
    best = benchmark.stats.stats.min
    peak, peak_kind = common.peak_memory(update)
    rate = flops / best
    ceiling = ceilings.get(f"matmul_{amp}_TFLOPs", ceilings["matmul_fp32_TFLOPs"])
    record(kind="round", model=model, provider=provider, batch=batch_size, autocast=amp,
           size=f"{model} B={batch_size}", samples_per_s=batch_size / best,
           flops_per_update=flops, model_TFLOPs=rate / common.TFLOP,
           frac_matmul=rate / common.TFLOP / ceiling, loss=first_loss,
           peak_mem_MiB=peak, peak_mem_kind=peak_kind)
