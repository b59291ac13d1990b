"""Measure the kernels' error against the float64 references (for notes and reviews).

    TRITON_INTERPRET=1 .venv/bin/python -m fastdiff.kernels.accuracy [--cases 200]

For each backend (torch; triton when it can run here), op and input dtype it draws random
cases (batch 1-9, 1 to ~3000 elements per sample, angles in [0, pi/2] including the ends,
and student step counts N in 1..8192) and prints the largest norm-relative error
``|out - ref| / |ref|`` and the largest elementwise error relative to the magnitude of the
terms summed there (``|cos D z| + |sin D v|`` for ddim_step; ``|c_z z| + |c_1 v_1| +
|c_2 v_2|`` for pd_target): the natural scale of a linear combination's rounding error,
which stays meaningful where the terms cancel (a 1-element sample can cancel to ~0, and
then no float32 method is 1e-5 relative to the result). The references see the same
(rounded) inputs, so a half-precision row measures the kernel's float32 math plus rounding
its output. Loss rows give the relative error of the value and the norm-relative error of
the gradient wrt ``v_student``, taken with an upstream gradient of 2**10 as a loss scaler
would (float16 gradients of a mean over ~10^4 elements underflow otherwise); with the
"const" weighting near phi = 0 (weight ~1e-8) float16 gradients underflow even then, and
that row shows it: train float16 students with a larger loss scale.
"""

from __future__ import annotations

import argparse
import math
import os
import random

import torch

from . import ddim_step, distill_loss, fused_pd_loss, pd_target
from ._checks import METRICS, WEIGHTINGS
from .ddim_step import ddim_step_reference
from .dispatch import TRITON_INTERPRETED, triton
from .distill_loss import distill_loss_reference
from .fused_pd_loss import fused_pd_loss_reference
from .pd_target import pd_target_reference

HALF_PI = math.pi / 2
SIZES = [1, 2, 3, 7, 97, 1023, 1024, 1025, 2048, 2999]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _angles(rng: random.Random, batch: int):
    """(phi_t, phi_mid, phi_end): half random, half from a student schedule with N <= 8192."""
    ts, mids, ends = [], [], []
    for _ in range(batch):
        if rng.random() < 0.5:
            n = rng.choice([1, 2, 64, 1024, 8192, rng.randint(1, 8192)])
            i = rng.choice([1, n, rng.randint(1, n)])
            t = i / n
            ts.append(HALF_PI * t)
            mids.append(HALF_PI * (t - 0.5 / n))
            ends.append(HALF_PI * (t - 1.0 / n))
        else:
            phi_t = rng.choice([HALF_PI, rng.uniform(1e-4, HALF_PI)])
            phi_end = rng.choice([0.0, rng.uniform(0.0, phi_t - 1e-4)])
            ts.append(phi_t)
            ends.append(phi_end)
            mids.append(0.5 * (phi_t + phi_end))
    return tuple(torch.tensor(x, dtype=torch.float64) for x in (ts, mids, ends))


def _err(out: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor) -> tuple[float, float]:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf, math.inf
    norm = float((out - ref).norm() / ref.norm().clamp_min(1e-300))
    elem = float(((out - ref).abs() / terms.clamp_min(1e-300)).max())
    return norm, elem


def _terms(coefficients, tensors) -> torch.Tensor:
    """Per-element sum of |coefficient * input| (float64)."""
    return sum(c.view(-1, 1).abs() * x.double().abs() for c, x in zip(coefficients, tensors))


def measure(cases: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    results: dict = {}

    def record(key, values):
        old = results.get(key, (0.0,) * len(values))
        results[key] = tuple(max(a, b) for a, b in zip(old, values))

    for _ in range(cases):
        batch = rng.randint(1, 9)
        shape = (batch, rng.choice(SIZES))
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        base = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(5)]
        phi_t, phi_mid, phi_end = _angles(rng, batch)
        weighting, metric = rng.choice(WEIGHTINGS), rng.choice(METRICS)
        for dname, dtype in DTYPES.items():
            z, v1, v2, vs, vt = (x.to(dtype) for x in base)
            delta = phi_end - phi_t
            record(("ddim_step", dname),
                   _err(ddim_step(z, v1, phi_t, phi_end),
                        ddim_step_reference(z, v1, phi_t, phi_end),
                        _terms((torch.cos(delta), torch.sin(delta)), (z, v1))))
            d1, d2 = phi_mid - phi_t, phi_end - phi_mid
            coefficients = (torch.sin(d1) * torch.sin(d2) / torch.sin(delta),
                            torch.cos(d2) * torch.sin(d1) / torch.sin(delta),
                            torch.sin(d2) / torch.sin(delta))
            record(("pd_target", dname),
                   _err(pd_target(z, v1, v2, phi_t, phi_mid, phi_end),
                        pd_target_reference(z, v1, v2, phi_t, phi_mid, phi_end),
                        _terms(coefficients, (z, v1, v2))))
            for name, ours, ref, args in (
                ("distill_loss", distill_loss, distill_loss_reference, (vt, phi_t)),
                ("fused_pd_loss", fused_pd_loss, fused_pd_loss_reference,
                 (z, v1, v2, phi_t, phi_mid, phi_end)),
            ):
                x = vs.clone().requires_grad_()
                loss = ours(x, *args, weighting, metric)
                (loss * 2.0**10).backward()
                x64 = vs.double().requires_grad_()
                loss64 = ref(x64, *args, weighting, metric)
                (loss64 * 2.0**10).backward()
                loss, loss64 = float(loss.detach()), float(loss64.detach())
                value_err = abs(loss - loss64) / max(abs(loss64), 1e-300)
                grad_err = float((x.grad.double() - x64.grad).norm() / x64.grad.norm())
                record((name, dname), (value_err, grad_err))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    backends = ["torch"]
    if triton is not None and (TRITON_INTERPRETED or torch.cuda.is_available()):
        backends.append("triton")
    device = "cpu"  # the cases are CPU tensors; on CUDA run the tests instead
    print(f"{args.cases} random cases per backend, device {device}")
    print(f"{'backend':8} {'op':14} {'dtype':9} {'max norm-rel':>13} {'max term-rel':>13}"
          "   (losses: value rel, grad norm-rel)")
    for backend in backends:
        os.environ["FASTDIFF_KERNELS"] = backend
        for (op, dtype), (a, b) in sorted(measure(args.cases, args.seed).items()):
            print(f"{backend:8} {op:14} {dtype:9} {a:13.2e} {b:13.2e}")


if __name__ == "__main__":
    main()
