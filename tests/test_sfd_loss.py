"""fastdiff.kernels.sfd_loss: both backends (torch, Triton under the interpreter) vs float64."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from fastdiff.kernels import METRICS  # noqa: E402
from fastdiff.kernels.ddim_step import ddim_step_reference  # noqa: E402
from fastdiff.kernels.sfd_loss import sfd_loss, sfd_loss_reference  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DEVICE = torch.device(os.environ.get("FASTDIFF_TEST_DEVICE", "cpu"))  # set by conftest.py

HALF_PI = math.pi / 2
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(1,), (3,), (97,), (1023,), (1024,), (1025,), (2999,), (3, 5, 7), (1, 8, 8)]
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
MAX_ERR: dict = {}


def randn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


angle = st.one_of(st.sampled_from([0.0, HALF_PI]), st.floats(0.0, HALF_PI))


@settings(deadline=None, max_examples=30,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 7), shape=st.sampled_from(SHAPES), dtype=st.sampled_from(DTYPES),
       metric=st.sampled_from(METRICS), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_matches_float64(backend, batch, shape, dtype, metric, seed, data):
    full = (batch, *shape)
    vs, z, zt = (randn(full, seed + k, dtype) for k in range(3))
    p0 = torch.tensor(data.draw(st.lists(angle, min_size=batch, max_size=batch)),
                      dtype=torch.float64)
    p1 = data.draw(st.one_of(angle, st.lists(angle, min_size=batch, max_size=batch)
                             .map(lambda x: torch.tensor(x, dtype=torch.float64))))
    loss = sfd_loss(vs, z, zt, p0, p1, metric)
    ref = sfd_loss_reference(vs, z, zt, p0, p1, metric)
    assert loss.dtype == torch.float32 and loss.shape == () and torch.isfinite(loss)
    err = abs(float(loss) - float(ref)) / abs(float(ref))
    key = (backend, str(dtype).split(".")[-1], "forward")
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)
    # same low-precision inputs, float32 math inside: float32-level agreement for every dtype
    assert err <= 2e-6, err


GRAD_SHAPE = (4, 1100)  # one full block and a masked tail per sample
P_FROM = torch.tensor([HALF_PI, 0.9, 0.3, 0.02], dtype=torch.float64)
P_TO = torch.tensor([1.2, 0.5, 0.0, 0.0], dtype=torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", METRICS)
def test_gradient_matches_float64_autograd(backend, metric, dtype):
    vs, z, zt = (randn(GRAD_SHAPE, 50 + k, dtype) for k in range(3))
    x = vs.clone().requires_grad_()
    sfd_loss(x, z, zt, P_FROM, P_TO, metric).backward()
    x64 = vs.double().requires_grad_()
    sfd_loss_reference(x64, z, zt, P_FROM, P_TO, metric).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    ref = x64.grad
    nonzero = ref.abs().sum(dim=1) > 0
    assert bool(nonzero[:3].all())  # rows with sin Δ ≠ 0 get a gradient
    err = float((x.grad.double() - ref).norm() / ref.norm())
    key = (backend, str(dtype).split(".")[-1], "grad")
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)
    assert err < GRAD_TOL[dtype], err


def test_exact_target_gives_zero_loss_and_edges_are_finite(backend):
    """From φ = π/2 (pure noise) to φ = 0 (data): z_to = v·sin Δ with Δ = −π/2, i.e. −v."""
    vs, z = randn((3, 40), 1), randn((3, 40), 2)
    p0 = torch.full((3,), HALF_PI, dtype=torch.float64)
    p1 = torch.zeros(3, dtype=torch.float64)
    target = ddim_step_reference(z, vs, p0, p1).float()
    for metric in METRICS:
        assert float(sfd_loss(vs, z, target, p0, p1, metric)) < 1e-6
        wrong = float(sfd_loss(vs, z, target + 0.5, p0, p1, metric))
        assert wrong > 0.1
    torch.testing.assert_close(target, -vs, atol=1e-6, rtol=0)
    x = vs.clone().requires_grad_()
    sfd_loss(x, z, target + 0.1, p0, p1, "l2").backward()
    # d = 0.1 - ... : dL/dv = sin Δ · 2 d / (B n) = −2·(−0.1)/(120) per element
    torch.testing.assert_close(x.grad, torch.full_like(vs, 0.2 / 120), atol=1e-6, rtol=1e-4)


def test_no_gradient_to_state_or_target(backend):
    vs, z, zt = randn((2, 5), 1), randn((2, 5), 2), randn((2, 5), 3)
    z.requires_grad_()
    zt.requires_grad_()
    x = vs.clone().requires_grad_()
    sfd_loss(x, z, zt, 0.9, 0.4).backward()
    assert x.grad is not None and z.grad is None and zt.grad is None


def test_compiles_fullgraph(monkeypatch):
    monkeypatch.setenv("FASTDIFF_KERNELS", "torch")
    vs, z, zt = randn((3, 8), 1), randn((3, 8), 2), randn((3, 8), 3)
    p0 = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    p1 = torch.tensor([0.5, 0.2, 0.0], dtype=torch.float64)

    def f(v):
        return sfd_loss(v * 2.0, z, zt, p0, p1, "pseudo_huber")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, x2 = vs.clone().requires_grad_(), vs.clone().requires_grad_()
    out_c, out_e = compiled(x1), f(x2)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(x1.grad, x2.grad)


Z = randn((3, 4), 0)


@pytest.mark.parametrize("call,error,match", [
    (lambda: sfd_loss(Z, Z, Z, 0.5, 0.1, metric="l3"), ValueError, r"metric='l3'"),
    (lambda: sfd_loss(Z, Z[:1], Z, 0.5, 0.1), ValueError, r"z_t has shape \(1, 4\)"),
    (lambda: sfd_loss(Z, Z, Z[:, :2], 0.5, 0.1), ValueError, r"z_target has shape"),
    (lambda: sfd_loss(Z, Z, Z, torch.zeros(2, dtype=torch.float64), 0.1), ValueError,
     r"phi_from: expected .*shape \(3,\)"),
    (lambda: sfd_loss(Z, Z, Z, 0.5, "x"), TypeError, r"phi_to"),
    (lambda: sfd_loss(Z, Z, Z, 0.5, 0.1, metric="pseudo_huber", huber_c=0.0), ValueError,
     r"huber_c"),
    (lambda: sfd_loss(Z.long(), Z, Z, 0.5, 0.1), TypeError, r"v_student"),
])
def test_bad_inputs_raise_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_report_max_errors():
    """Runs last in this module: prints the worst relative errors seen per backend/dtype."""
    for key in sorted(MAX_ERR):
        print(f"\nsfd_loss max rel err {key}: {MAX_ERR[key]:.2e}")
