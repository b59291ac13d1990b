"""Kernel benchmarks: fastdiff's dispatched ops against eager torch and torch.compile.

Providers, run side by side for each (op, size, dtype):

* ``fastdiff``: the public op (Triton on CUDA, the torch path on CPU; FASTDIFF_KERNELS);
* ``eager``: the same math as a user would write it in unfused torch (float32 inside);
* ``compile``: ``torch.compile(eager, dynamic=False)``, compiled once per shape and dtype
  outside the timed region;
* ``fastdiff-2pass`` (losses with a one-pass variant): the lean eager route with the
  one-pass variant off (a forward pass, then a recomputing backward pass);
* ``fastdiff-op``: every call through the ``torch.library`` custom op (the route
  torch.compile traces; the only eager route before the lean one): its dispatch cost.

Every provider computes everything from the same inputs (tensors and float64 angles),
including the per-sample coefficients. ``extra_info["GBps"]`` is the fewest bytes the op
must move divided by the median call, and ``frac_copy`` its fraction of the copy ceiling.
The selected providers of one (op, size, dtype) are timed interleaved (A B C A B C ...) in
one process on the same inputs; each record carries min, median, spread (max/min), repeats
and the load average before and after (DESIGN §5). Bytes moved per op:

* ddim_step: read z, v; write z_to                      -> 3 N elements
* pd_target: read z, v1, v2; write target               -> 4 N
* distill_loss fwd: read v_student, v_target            -> 2 N
* distill_loss fwd+bwd: the above, write the gradient   -> 3 N
* fused_pd_loss fwd+bwd: read 4 tensors, write gradient -> 5 N
(N elements of the input dtype; fwd+bwd counts one read of each input, as a single fused
pass would do, so a two-pass forward-then-backward implementation tops out below 1.)
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

from benchmarks import common
from fastdiff import kernels

# ---------------------------------------------------------------- the eager math


def _col(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.view(-1, *([1] * (like.dim() - 1)))


def _pd_coefficients(phi_t, phi_mid, phi_end):
    d1, d2 = phi_mid - phi_t, phi_end - phi_mid
    sin_d = torch.sin(phi_end - phi_t)
    cz = torch.sin(d1) * torch.sin(d2) / sin_d
    c1 = torch.cos(d2) * torch.sin(d1) / sin_d
    c2 = torch.sin(d2) / sin_d
    return cz.float(), c1.float(), c2.float()


def _weight(phi):
    """snr_trunc v-space weight max(cos², sin²), float32 (B,)."""
    return torch.maximum(torch.cos(phi) ** 2, torch.sin(phi) ** 2).float()


def eager_ddim_step(z, v, phi_from, phi_to):
    d = phi_to - phi_from
    c, s = torch.cos(d).float(), torch.sin(d).float()
    return (_col(c, z) * z.float() + _col(s, z) * v.float()).to(z.dtype)


def _target_f32(z, v1, v2, phi_t, phi_mid, phi_end):
    cz, c1, c2 = _pd_coefficients(phi_t, phi_mid, phi_end)
    return _col(cz, z) * z.float() + _col(c1, z) * v1.float() + _col(c2, z) * v2.float()


def eager_pd_target(z, v1, v2, phi_t, phi_mid, phi_end):
    return _target_f32(z, v1, v2, phi_t, phi_mid, phi_end).to(z.dtype)


def eager_distill_loss(vs, vt, phi_t):
    d = vs.float() - vt.float()
    return (_weight(phi_t) * d.square().flatten(1).mean(dim=1)).mean()


def eager_fused_pd_loss(vs, z, v1, v2, phi_t, phi_mid, phi_end):
    d = vs.float() - _target_f32(z, v1, v2, phi_t, phi_mid, phi_end)
    return (_weight(phi_t) * d.square().flatten(1).mean(dim=1)).mean()


# op name -> (fastdiff function, eager function, tensors in, grad?, elements moved per N)
OPS = {
    "ddim_step": (kernels.ddim_step, eager_ddim_step, 2, False, 3),
    "pd_target": (kernels.pd_target, eager_pd_target, 3, False, 4),
    "distill_loss_fwd": (kernels.distill_loss, eager_distill_loss, 2, False, 2),
    "distill_loss_fwdbwd": (kernels.distill_loss, eager_distill_loss, 2, True, 3),
    "fused_pd_loss_fwdbwd": (kernels.fused_pd_loss, eager_fused_pd_loss, 4, True, 5),
}
ANGLES = {"ddim_step": 2, "pd_target": 3, "distill_loss_fwd": 1, "distill_loss_fwdbwd": 1,
          "fused_pd_loss_fwdbwd": 3}

# size name -> shape (B, C, H, W); "128x8x8": a batch of 128 8×8 digit-sized images (the
# tiny call, bound by fixed per-call host cost)
SIZES = {
    "128x8x8": (128, 1, 8, 8),     # 8,192 elements
    "64K": (64, 1, 32, 32),        # 65,536
    "1M": (64, 4, 64, 64),         # 1,048,576
    "16M": (64, 4, 256, 256),      # 16,777,216
    "64M": (256, 4, 256, 256),     # 67,108,864 (CUDA only)
}
PROVIDERS = ("fastdiff", "eager", "compile")
#: Routes of fastdiff's own op compared side by side with the shipped one (CPU and CUDA):
#: the two-pass lean route and the custom-op route, where they differ from "fastdiff".
ROUTE_OPS = {"fused_pd_loss_fwdbwd": ("fastdiff-2pass", "fastdiff-op"),
             "distill_loss_fwdbwd": ("fastdiff-op",), "ddim_step": ("fastdiff-op",)}
QUICK = {("fused_pd_loss_fwdbwd", "1M", "fp32"), ("ddim_step", "128x8x8", "fp32")}


def _sizes_for(dtype_name: str) -> list[str]:
    if common.is_cuda():
        return list(SIZES)
    # CPU: three sizes up to 16M so that the whole suite keeps under 10 minutes
    return ["128x8x8", "1M", "16M"]


def _cases():
    for op in OPS:
        for dtype in common.dtypes():
            dn = common.dtype_name(dtype)
            for size in _sizes_for(dn):
                for provider in PROVIDERS + ROUTE_OPS.get(op, ()):
                    quick = (op, size, dn) in QUICK and provider in PROVIDERS
                    marks = [pytest.mark.quick] if quick else []
                    yield pytest.param(op, size, dn, provider, marks=marks,
                                       id=f"{op}-{size}-{dn}-{provider}")


def make_inputs(op: str, shape, dtype: torch.dtype, seed: int = 0):
    """Tensors and float64 angles (student steps N = 64, t = i / N) for `op`."""
    dev = common.device()
    gen = torch.Generator(device=dev).manual_seed(seed)
    n_tensors, needs_grad = OPS[op][2], OPS[op][3]
    tensors = [torch.randn(shape, generator=gen, device=dev).to(dtype) for _ in range(n_tensors)]
    if needs_grad:
        tensors[0].requires_grad_(True)
    steps = 64
    i = torch.randint(1, steps + 1, (shape[0],), generator=gen, device=dev)
    t = i.double() / steps
    phis = [math.pi / 2 * t, math.pi / 2 * (t - 0.5 / steps), math.pi / 2 * (t - 1.0 / steps)]
    if ANGLES[op] == 1:
        phis = phis[:1]
    elif ANGLES[op] == 2:
        phis = phis[:2]
    return tensors, phis


_COMPILED: dict = {}  # this group's compiled artefacts (cleared when the group changes)


def _route(fn, *, one_pass: bool = True, eager_route: bool = True):
    """`fn` with fastdiff's route switches (kernels._register) set for the call only, so
    that the interleaved `fastdiff` provider keeps the shipped defaults."""
    reg = importlib.import_module("fastdiff.kernels._register")

    def call(*args):
        saved = reg.ONE_PASS, reg.EAGER_ROUTE
        reg.ONE_PASS, reg.EAGER_ROUTE = one_pass, eager_route
        try:
            return fn(*args)
        finally:
            reg.ONE_PASS, reg.EAGER_ROUTE = saved

    return call


def _callable(op, provider, size, dn):
    fastdiff_fn, eager_fn = OPS[op][0], OPS[op][1]
    if provider == "fastdiff":
        return fastdiff_fn
    if provider == "fastdiff-2pass":
        return _route(fastdiff_fn, one_pass=False)
    if provider == "fastdiff-op":
        return _route(fastdiff_fn, eager_route=False)
    if provider == "eager":
        return eager_fn
    key = (op, size, dn)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(eager_fn, dynamic=False)
    return _COMPILED[key]


_GROUPS: dict = {}


def _measure_group(op: str, size: str, dtype_name: str, providers: list, quick: bool) -> dict:
    """The selected providers of one (op, size, dtype) on the same inputs, timed
    interleaved (A B C A B C ...) after each has compiled and warmed up; {provider: figure}."""
    key = (op, size, dtype_name, tuple(providers))
    if key in _GROUPS:
        return _GROUPS[key]
    _GROUPS.clear()
    _COMPILED.clear()  # one group's compiled artefacts alive at a time (memory)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    tensors, phis = make_inputs(op, SIZES[size], dtype)
    needs_grad = OPS[op][3]
    calls = {}
    for provider in providers:
        fn = _callable(op, provider, size, dtype_name)
        if needs_grad:
            def call(fn=fn):
                loss = fn(*tensors, *phis)
                return torch.autograd.grad(loss, tensors[0])[0]
        else:
            def call(fn=fn):
                with torch.no_grad():
                    return fn(*tensors, *phis)
        call()  # compile (for "compile" and the proposals) and warm up, untimed
        calls[provider] = common.synced(call)
    # FASTDIFF_BENCH_REPS: more interleaved rounds for a steadier median on a loaded box
    reps = common.MIN_REPS if quick else int(os.environ.get("FASTDIFF_BENCH_REPS", "7"))
    figures = common.interleaved(calls, reps=reps, target_s=0.05, warmup=1)
    _GROUPS[key] = figures
    return figures


@pytest.mark.parametrize("op,size,dtype_name,provider", list(_cases()))
def bench_kernel(benchmark, record, quick, request, op, size, dtype_name, provider):
    group = [p["provider"] for p in common.selected_params(request, "bench_kernel")
             if (p["op"], p["size"], p["dtype_name"]) == (op, size, dtype_name)]
    fig = _measure_group(op, size, dtype_name, group or [provider], quick)[provider]
    common.feed_benchmark(benchmark, fig["times_s"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    numel = math.prod(SIZES[size])
    moved = OPS[op][4] * numel * torch.finfo(dtype).bits // 8
    record(kind="kernel", op=op, provider=provider, size=size, numel=numel, dtype=dtype_name,
           min_bytes=moved, GBps=moved / fig["median_s"] / common.GB, group=group,
           **{k: fig[k] for k in ("min_s", "median_s", "max_s", "spread", "reps", "iters",
                                  "loadavg_before", "loadavg_after")})
    copy_gbps = benchmark.extra_info["ceilings"]["copy_GBps"]
    benchmark.extra_info["frac_copy"] = benchmark.extra_info["GBps"] / copy_gbps
