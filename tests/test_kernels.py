"""fastdiff.kernels: both backends (torch, Triton under the interpreter) against float64.

Run: TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_kernels*.py -x -q
(the variable is also set below and in conftest.py, before Triton is imported).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from fastdiff.kernels import (  # noqa: E402
    METRICS,
    WEIGHTINGS,
    _register,
    ddim_step,
    distill_loss,
    fused_pd_loss,
    pd_target,
)
from fastdiff.kernels.ddim_step import ddim_step_reference  # noqa: E402
from fastdiff.kernels.distill_loss import distill_loss_reference  # noqa: E402
from fastdiff.kernels.fused_pd_loss import fused_pd_loss_reference  # noqa: E402
from fastdiff.kernels.pd_target import pd_target_reference  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DEVICE = torch.device(os.environ.get("FASTDIFF_TEST_DEVICE", "cpu"))  # set by conftest.py

HALF_PI = math.pi / 2
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# norm-relative tolerance of an elementwise op's output, per dtype: float32 is the contract
# (1e-5); the half types are bounded by rounding the output (2^-9 and 2^-12 per element)
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# trailing shapes: 1 element, primes, multiples and non-multiples of BLOCK (1024)
SHAPES = [(1,), (2,), (3,), (7,), (97,), (1023,), (1024,), (1025,), (2048,), (2999,),
          (3, 5, 7), (3, 16, 16), (2, 1, 37)]


def prop(examples):
    # the backend fixture only sets an env var: sharing it across examples is intended
    return settings(deadline=None, max_examples=examples,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


PROPERTY = prop(30)

#: The routes to the same implementations (kernels/_register.py): the lean eager route
#: with the one-pass loss+gradient variant (the default for float32 students; here for
#: bfloat16 ones too, so that its bfloat16 arithmetic is checked), without it (forward,
#: then a recomputing backward), and every call through the torch.library custom op (the
#: route torch.compile traces).
ROUTES = ("one_pass", "two_pass", "custom_op")


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch):
    monkeypatch.setattr(_register, "ONE_PASS", request.param == "one_pass")
    monkeypatch.setattr(_register, "ONE_PASS_DTYPES", (torch.float32, torch.bfloat16))
    monkeypatch.setattr(_register, "EAGER_ROUTE", request.param != "custom_op")
    return request.param


def randn(shape, seed, dtype=torch.float32):
    """Fresh standard-normal data (never zeros), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def rel_err(out, ref):
    """Norm-relative error and max elementwise error relative to max |ref|."""
    out, ref = out.double(), ref.double()
    scale = ref.abs().max().clamp_min(1e-300)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300)), float(
        (out - ref).abs().max() / scale
    )


def assert_close(out, ref, tol):
    assert torch.isfinite(out).all()
    norm_rel, max_rel = rel_err(out, ref)
    assert norm_rel < tol, (norm_rel, tol)
    assert max_rel < 4 * tol, (max_rel, tol)


# angles anywhere in [0, pi/2], with the ends themselves drawn often
angle = st.one_of(st.sampled_from([0.0, HALF_PI]), st.floats(0.0, HALF_PI))


@st.composite
def batches(draw, dtypes=DTYPES):
    batch = draw(st.integers(1, 9))
    shape = (batch,) + draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, dtype, seed


@st.composite
def pd_angles(draw, batch):
    """phi_t >= phi_mid >= phi_end with a step of at least 1e-4 (phi_end may be 0)."""
    ts, mids, ends = [], [], []
    for _ in range(batch):
        phi_t = draw(st.one_of(st.just(HALF_PI), st.floats(1e-4, HALF_PI)))
        phi_end = draw(st.one_of(st.just(0.0), st.floats(0.0, phi_t - 1e-4)))
        frac = draw(st.one_of(st.just(0.5), st.floats(0.0, 1.0)))
        ts.append(phi_t)
        ends.append(phi_end)
        mids.append(phi_end + frac * (phi_t - phi_end))
    return tuple(torch.tensor(x, dtype=torch.float64) for x in (ts, mids, ends))


# ---------------------------------------------------------------- elementwise ops
@PROPERTY
@given(case=batches(), data=st.data())
def test_ddim_step_matches_float64(backend, case, data):
    shape, dtype, seed = case
    z, v = randn(shape, seed, dtype), randn(shape, seed + 1, dtype)
    phi_from = torch.tensor(data.draw(st.lists(angle, min_size=shape[0], max_size=shape[0])),
                            dtype=torch.float64)
    phi_to = data.draw(st.one_of(angle, st.lists(angle, min_size=shape[0],
                                                 max_size=shape[0]).map(torch.tensor)))
    out = ddim_step(z, v, phi_from, phi_to)
    assert out.dtype == dtype and out.shape == z.shape
    assert_close(out, ddim_step_reference(z, v, phi_from, phi_to), TOL[dtype])


@PROPERTY
@given(case=batches(), data=st.data())
def test_pd_target_matches_float64(backend, case, data):
    shape, dtype, seed = case
    z, v1, v2 = (randn(shape, seed + k, dtype) for k in range(3))
    phi_t, phi_mid, phi_end = data.draw(pd_angles(shape[0]))
    out = pd_target(z, v1, v2, phi_t, phi_mid, phi_end)
    assert out.dtype == dtype and out.shape == z.shape
    assert_close(out, pd_target_reference(z, v1, v2, phi_t, phi_mid, phi_end), TOL[dtype])


def student_schedule(n_steps, steps):
    """Angles (t, t', t'') for the student steps ``i`` of an ``n_steps``-step sampler."""
    t = torch.tensor(steps, dtype=torch.float64) / n_steps
    return HALF_PI * t, HALF_PI * (t - 0.5 / n_steps), HALF_PI * (t - 1.0 / n_steps)


@prop(40)
@given(n_steps=st.one_of(st.sampled_from([1, 2, 64, 1024, 8192]), st.integers(1, 8192)),
       data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_float32_accuracy_independent_of_step_count(backend, n_steps, data, seed):
    """Contract: float32 within 1e-5 relative of float64 for every N in 1..8192."""
    steps = data.draw(st.lists(st.one_of(st.just(1), st.just(n_steps), st.integers(1, n_steps)),
                               min_size=1, max_size=3))
    phi_t, phi_mid, phi_end = student_schedule(n_steps, steps)
    shape = (len(steps), 3, 7, 11)
    z, v1, v2, vs = (randn(shape, seed + k) for k in range(4))

    target = pd_target(z, v1, v2, phi_t, phi_mid, phi_end)
    assert_close(target, pd_target_reference(z, v1, v2, phi_t, phi_mid, phi_end), 1e-5)
    assert_close(ddim_step(z, v1, phi_t, phi_end), ddim_step_reference(z, v1, phi_t, phi_end),
                 1e-5)
    loss = fused_pd_loss(vs, z, v1, v2, phi_t, phi_mid, phi_end)
    ref = fused_pd_loss_reference(vs, z, v1, v2, phi_t, phi_mid, phi_end)
    assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref))


# ---------------------------------------------------------------- losses
@prop(25)
@given(case=batches(), data=st.data(), weighting=st.sampled_from(WEIGHTINGS),
       metric=st.sampled_from(METRICS))
def test_losses_match_float64(backend, route, case, data, weighting, metric):
    shape, dtype, seed = case
    vs, z, v1, v2 = (randn(shape, seed + k, dtype) for k in range(4))
    phi_t, phi_mid, phi_end = data.draw(pd_angles(shape[0]))
    vt = randn(shape, seed + 7, dtype)
    for loss, ref in (
        (distill_loss(vs, vt, phi_t, weighting, metric),
         distill_loss_reference(vs, vt, phi_t, weighting, metric)),
        (fused_pd_loss(vs, z, v1, v2, phi_t, phi_mid, phi_end, weighting, metric),
         fused_pd_loss_reference(vs, z, v1, v2, phi_t, phi_mid, phi_end, weighting, metric)),
    ):
        assert loss.dtype == torch.float32 and loss.shape == ()
        assert torch.isfinite(loss)
        # the inputs are the same low-precision numbers, the math float32 in both cases
        assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref)) + 1e-30


GRAD_SHAPE = (3, 1100)  # one full block and a masked tail per sample
GRAD_ANGLES = (torch.tensor([HALF_PI, 0.7, 0.01], dtype=torch.float64),
               torch.tensor([HALF_PI - 0.01, 0.4, 0.005], dtype=torch.float64),
               torch.tensor([HALF_PI - 0.02, 0.1, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_loss_gradients_match_float64_autograd(backend, route, weighting, metric):
    phi_t, phi_mid, phi_end = GRAD_ANGLES
    vs, vt, z, v1, v2 = (randn(GRAD_SHAPE, 100 + k) for k in range(5))
    cases = [
        (lambda x: distill_loss(x, vt, phi_t, weighting, metric),
         lambda x: distill_loss_reference(x, vt, phi_t, weighting, metric)),
        (lambda x: fused_pd_loss(x, z, v1, v2, phi_t, phi_mid, phi_end, weighting, metric),
         lambda x: fused_pd_loss_reference(x, z, v1, v2, phi_t, phi_mid, phi_end, weighting,
                                           metric)),
    ]
    for ours, reference in cases:
        x = vs.clone().requires_grad_()
        ours(x).backward()
        x64 = vs.double().requires_grad_()
        reference(x64).backward()
        assert x.grad.dtype == torch.float32
        assert_close(x.grad, x64.grad, 1e-5)


UPSTREAMS = (1.0, 2.0**10, 0.75)  # loss.backward(); a loss scaler; a weighted sum of losses


@prop(20)
@given(case=batches(), data=st.data(), weighting=st.sampled_from(WEIGHTINGS),
       metric=st.sampled_from(METRICS), upstream=st.sampled_from(UPSTREAMS))
def test_loss_values_and_gradients_match_float64_every_route(backend, route, case, data,
                                                             weighting, metric, upstream):
    """Every route (one pass, two passes, custom op) on random shapes, dtypes and angles
    (t = 1, t'' = 0, sizes off the block): the value and the gradient wrt v_student
    against float64 autograd, with the upstream gradient a loss scaler or a weighted sum
    would hand in. float16 with the "const" weighting is left out: near t = 0 its weights
    (~1e-8) make float16 gradients underflow whatever the kernel (accuracy.py shows it)."""
    shape, dtype, seed = case
    if dtype == torch.float16 and weighting == "const":
        weighting = "snr_trunc"
    vs, z, v1, v2 = (randn(shape, seed + k, dtype) for k in range(4))
    angles = data.draw(pd_angles(shape[0]))
    x = vs.clone().requires_grad_()
    loss = fused_pd_loss(x, z, v1, v2, *angles, weighting, metric)
    (loss * upstream).backward()
    x64 = vs.double().requires_grad_()
    ref = fused_pd_loss_reference(x64, z, v1, v2, *angles, weighting, metric)
    (ref * upstream).backward()
    loss, ref = loss.detach(), ref.detach()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref)) + 1e-30
    assert x.grad.dtype == dtype and x.grad.shape == vs.shape
    if metric == "l1":  # sign(d) flips on float32 rounding where |d| ~ 0: skip those
        keep = (vs.double() - pd_target_reference(z, v1, v2, *angles)).abs() > 1e-4
        assert_close(x.grad.double()[keep], x64.grad[keep], TOL[dtype])
    else:
        assert_close(x.grad, x64.grad, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_gradient_has_input_dtype(backend, route, dtype):
    phi_t, phi_mid, phi_end = GRAD_ANGLES
    vs, z, v1, v2 = (randn(GRAD_SHAPE, 200 + k, dtype) for k in range(4))
    x = vs.clone().requires_grad_()
    fused_pd_loss(x, z, v1, v2, phi_t, phi_mid, phi_end, metric="pseudo_huber").backward()
    x64 = vs.double().requires_grad_()
    fused_pd_loss_reference(x64, z, v1, v2, phi_t, phi_mid, phi_end,
                            metric="pseudo_huber").backward()
    assert x.grad.dtype == dtype
    assert_close(x.grad, x64.grad, TOL[dtype])


def test_no_gradient_to_target(backend):
    vs, vt = randn((2, 5), 1), randn((2, 5), 2)
    vt.requires_grad_()
    x = vs.clone().requires_grad_()
    distill_loss(x, vt, 0.3).backward()
    assert x.grad is not None and vt.grad is None


# ---------------------------------------------------------------- identities
@PROPERTY
@given(batch=st.integers(1, 9), shape=st.sampled_from(SHAPES), seed=st.integers(0, 2**31 - 1),
       a=angle, b=angle)
def test_ddim_step_there_and_back(backend, batch, shape, seed, a, b):
    """With the exact velocity, stepping a -> b and back b -> a returns z."""
    x, eps = randn((batch,) + shape, seed), randn((batch,) + shape, seed + 1)
    z_a = math.cos(a) * x + math.sin(a) * eps
    v_a = math.cos(a) * eps - math.sin(a) * x
    v_b = math.cos(b) * eps - math.sin(b) * x
    z_b = ddim_step(z_a, v_a, a, b)
    assert_close(z_b, math.cos(b) * x + math.sin(b) * eps, 1e-5)
    assert_close(ddim_step(z_b, v_b, b, a), z_a, 1e-5)


@PROPERTY
@given(case=batches(dtypes=[torch.float32]), data=st.data())
def test_student_with_pd_target_lands_on_teacher(backend, case, data):
    shape, _, seed = case
    z, v1, v2 = (randn(shape, seed + k) for k in range(3))
    phi_t, phi_mid, phi_end = data.draw(pd_angles(shape[0]))
    teacher = ddim_step(ddim_step(z, v1, phi_t, phi_mid), v2, phi_mid, phi_end)
    student = ddim_step(z, pd_target(z, v1, v2, phi_t, phi_mid, phi_end), phi_t, phi_end)
    assert_close(student, teacher, 1e-5)


@prop(25)
@given(case=batches(dtypes=[torch.float32]), data=st.data(),
       weighting=st.sampled_from(WEIGHTINGS), metric=st.sampled_from(METRICS))
def test_fused_pd_loss_equals_distill_loss_of_pd_target(backend, case, data, weighting, metric):
    shape, _, seed = case
    vs, z, v1, v2 = (randn(shape, seed + k) for k in range(4))
    angles = data.draw(pd_angles(shape[0]))
    fused = fused_pd_loss(vs, z, v1, v2, *angles, weighting, metric)
    unfused = distill_loss(vs, pd_target(z, v1, v2, *angles), angles[0], weighting, metric)
    assert abs(float(fused) - float(unfused)) <= 1e-5 * abs(float(unfused)) + 1e-30


def test_edge_angles_are_finite(backend, route):
    """t = 1 (alpha = 0), the last student step to t'' = 0, N = 1, every dtype."""
    for dtype in DTYPES:
        z, v1, v2, vs = (randn((2, 33), k, dtype) for k in range(4))
        phi_t, phi_mid, phi_end = HALF_PI, HALF_PI / 2, 0.0
        outs = [
            ddim_step(z, v1, phi_t, phi_end), ddim_step(z, v1, phi_end, phi_t),
            pd_target(z, v1, v2, phi_t, phi_mid, phi_end),
            *(fused_pd_loss(vs, z, v1, v2, phi_t, phi_mid, phi_end, w, m)
              for w in WEIGHTINGS for m in METRICS),
            *(distill_loss(vs, v1, p, w, m) for p in (0.0, HALF_PI) for w in WEIGHTINGS
              for m in METRICS),
        ]
        assert all(torch.isfinite(o).all() for o in outs)


# ---------------------------------------------------------------- bad inputs
Z = torch.randn(3, 4)
PHI = torch.zeros(3, dtype=torch.float64)
BAD_INPUTS = [
    (lambda: ddim_step([1.0], Z, 0.0, 1.0), TypeError, r"z: expected a torch\.Tensor"),
    (lambda: ddim_step(Z, Z.int(), 0.0, 1.0), TypeError, r"v: expected a floating tensor"),
    (lambda: ddim_step(Z.bool(), Z, 0.0, 1.0), TypeError, r"z: expected a floating tensor"),
    (lambda: ddim_step(Z, Z[:, :3], 0.0, 1.0), ValueError,
     r"v has shape \(3, 3\) but z has shape \(3, 4\)"),
    (lambda: ddim_step(Z, Z.to("meta"), 0.0, 1.0), ValueError, r"v is on meta but z is on cpu"),
    (lambda: ddim_step(Z, Z.half(), 0.0, 1.0), TypeError, r"v has dtype torch\.float16"),
    (lambda: ddim_step(Z, Z, torch.zeros(4), 1.0), ValueError,
     r"phi_from: expected a 0-d tensor or shape \(3,\)"),
    (lambda: ddim_step(Z, Z, 0.0, torch.zeros(3, dtype=torch.int64)), TypeError,
     r"phi_to: expected a floating tensor"),
    (lambda: ddim_step(Z, Z, 0.0, "1"), TypeError, r"phi_to: expected a float"),
    (lambda: ddim_step(Z, Z, True, 1.0), TypeError, r"phi_from: expected a float"),
    (lambda: ddim_step(torch.tensor(1.0), torch.tensor(1.0), 0.0, 1.0), ValueError,
     r"z: expected a batched tensor"),
    (lambda: pd_target(Z, Z, Z[:2], PHI, PHI, PHI + 1), ValueError, r"v_2 has shape \(2, 4\)"),
    (lambda: pd_target(Z, Z, Z, PHI, PHI, torch.zeros((3, 1))), ValueError,
     r"phi_end: expected a 0-d tensor or shape \(3,\)"),
    (lambda: pd_target(Z, Z, Z, 0.5, 0.2, 0.5), ValueError, r"phi_end equals phi_t"),
    (lambda: fused_pd_loss(Z, Z, Z, Z, 0.5, 0.2, 0.5), ValueError, r"phi_end equals phi_t"),
    (lambda: distill_loss(Z, Z, PHI, "snr"), ValueError,
     r"weighting='snr' is not valid; expected one of .*snr_trunc.*snr\+1.*const"),
    (lambda: distill_loss(Z, Z, PHI, metric="l3"), ValueError,
     r"metric='l3' is not valid; expected one of .*l2.*l1.*pseudo_huber"),
    (lambda: fused_pd_loss(Z, Z, Z, Z, 1.0, 0.5, 0.0, "x"), ValueError, r"weighting='x'"),
    (lambda: fused_pd_loss(Z, Z, Z, Z, 1.0, 0.5, 0.0, metric="huber"), ValueError,
     r"metric='huber'"),
    (lambda: fused_pd_loss(Z, Z, Z.long(), Z, 1.0, 0.5, 0.0), TypeError,
     r"v_1: expected a floating tensor"),
    (lambda: fused_pd_loss(Z, Z, Z, Z, 1.0, torch.ones(2), 0.0), ValueError, r"phi_mid"),
    (lambda: distill_loss(Z, Z[:1], PHI), ValueError, r"v_target has shape \(1, 4\)"),
    (lambda: distill_loss(Z, Z, PHI[:2]), ValueError, r"phi_t: expected .*shape \(3,\)"),
    (lambda: distill_loss(Z, Z, PHI, metric="pseudo_huber", huber_c=-1.0), ValueError,
     r"huber_c: expected a positive"),
    (lambda: distill_loss(Z[:, :0], Z[:, :0], PHI), ValueError,
     r"v_student: expected a non-empty tensor"),
    (lambda: distill_loss(None, Z, PHI), TypeError, r"v_student: expected a torch\.Tensor"),
]


@pytest.mark.parametrize("call,error,match", BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_unknown_backend_is_rejected(monkeypatch):
    monkeypatch.setenv("FASTDIFF_KERNELS", "cuda")
    with pytest.raises(ValueError, match=r"FASTDIFF_KERNELS='cuda'.*torch.*triton"):
        ddim_step(Z, Z, 0.0, 1.0)
