"""fastdiff.engine.models: shapes, conditioning, add_scalar_condition, gradients, as_v_model."""

import math

import pytest
import torch

from fastdiff.engine.models import (
    MLP,
    UNet,
    add_scalar_condition,
    as_v_model,
    build_model,
    default_model_for,
)
from fastdiff.engine.schedules import CosineSchedule, LinearLogSNRSchedule, v_from_x_eps

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(model, seed=0):
    """Give every parameter (the zero-initialised output layer too) random values, so tests
    never compare zeros with zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _small_unet(**kw):
    return UNet(channels=16, num_res_blocks=1, **kw)


@pytest.mark.parametrize(
    "kw, shape",
    [
        (dict(in_channels=1, image_size=8), (1, 8, 8)),
        (dict(in_channels=3, image_size=16, channel_mults=(1, 2, 2)), (3, 16, 16)),
        (dict(in_channels=3, image_size=16, attention=False), (3, 16, 16)),
    ],
)
def test_unet_shapes_and_dtype(kw, shape):
    model = _randomise(_small_unet(num_classes=10, **kw))
    z = torch.randn(3, *shape)
    y = torch.tensor([0, 9, -1])
    for t in (torch.rand(3), torch.tensor(0.3), 0.7):
        v = model(z, t, y=y)
        assert v.shape == z.shape and v.dtype == z.dtype
        assert torch.isfinite(v).all() and v.abs().sum() > 0
    assert model(z.double(), torch.rand(3)).dtype == torch.float64
    assert model.prediction == "v" and model.num_classes == 10 and model.scalar_conds == ()


def test_mlp_shapes_labels_and_scalar_conds():
    model = _randomise(MLP(hidden=32, depth=2, num_classes=3, scalar_conds=("w",)))
    z, t = torch.randn(5, 2), torch.rand(5)
    y = torch.tensor([0, 1, 2, -1, -1])
    v = model(z, t, y=y, w=torch.full((5,), 2.0))
    assert v.shape == (5, 2) and torch.isfinite(v).all()
    # labels and w both change the output
    assert not torch.allclose(v, model(z, t, y=torch.tensor([1, 1, 2, -1, -1]), w=2.0))
    assert not torch.allclose(v, model(z, t, y=y, w=0.5))


def test_null_label_is_minus_one_and_none():
    model = _randomise(_small_unet(num_classes=4))
    z, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    null = model(z, t, y=torch.full((4,), -1))
    assert torch.equal(null, model(z, t, y=None))
    assert torch.equal(null, model(z, t))
    # the null row is its own learned row, distinct from every real class
    for c in range(4):
        assert not torch.allclose(null, model(z, t, y=torch.full((4,), c)))


def test_missing_scalar_condition_means_zero():
    model = _randomise(MLP(hidden=32, depth=2, scalar_conds=("w", "steps")))
    z, t = torch.randn(6, 2), torch.rand(6)
    assert torch.equal(model(z, t), model(z, t, w=torch.zeros(6), steps=0.0))
    assert not torch.allclose(model(z, t), model(z, t, w=1.0))


def test_unknown_keyword_raises_naming_it():
    model = _small_unet(scalar_conds=("w",))
    z, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with pytest.raises(TypeError, match="guidance"):
        model(z, t, guidance=torch.ones(2))
    with pytest.raises(ValueError, match="-1"):
        _small_unet(num_classes=3)(z, t, y=torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="num_classes=0"):
        model(z, t, y=torch.zeros(2, dtype=torch.long))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="image_size=12"):
        UNet(image_size=12, channel_mults=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="name"):
        MLP(scalar_conds=("y",))
    with pytest.raises(ValueError, match="kind"):
        build_model({"kind": "transformer"})
    with pytest.raises(ValueError, match="shape"):
        UNet()(torch.randn(2, 3, 8, 8), torch.rand(2))


@pytest.mark.parametrize("make", [lambda: _small_unet(num_classes=3), lambda: MLP(hidden=32)])
def test_add_scalar_condition_leaves_outputs_unchanged(make):
    model = _randomise(make())
    shape = (4, 1, 8, 8) if isinstance(model, UNet) else (4, 2)
    z, t = torch.randn(shape), torch.rand(4)
    cond = {"y": torch.tensor([0, 2, -1, 1])} if model.num_classes else {}
    before = model(z, t, **cond)
    assert before.abs().sum() > 0
    assert add_scalar_condition(model, "w", scale=0.5) is model
    assert model.scalar_conds == ("w",) and model.config["scalar_conds"] == {"w": 0.5}
    assert torch.equal(model(z, t, **cond), before)
    assert torch.equal(model(z, t, w=torch.linspace(0, 4, 4), **cond), before)
    # the config rebuilds the condition; a trained condition then does change the output
    rebuilt = build_model(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.scalar_conds == ("w",)
    with torch.no_grad():
        model.cond.scalars["w"][2].weight.normal_()
    assert not torch.allclose(model(z, t, w=torch.full((4,), 3.0), **cond), before)
    with pytest.raises(ValueError, match="already"):
        add_scalar_condition(model, "w")


def test_config_rebuilds_identical_model():
    model = _small_unet(in_channels=3, image_size=16, num_classes=5, scalar_conds={"w": 2.0})
    clone = build_model(model.config)
    assert clone.config == model.config
    sd, sd2 = model.state_dict(), clone.state_dict()
    assert sd.keys() == sd2.keys() and all(sd[k].shape == sd2[k].shape for k in sd)


def test_every_parameter_gets_gradient_after_one_step():
    torch.manual_seed(0)
    model = UNet(channels=16, num_classes=3, scalar_conds=("w",))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    z, t = torch.randn(8, 1, 8, 8), torch.rand(8)
    cond = dict(y=torch.tensor([0, 1, 2, -1, 0, 1, 2, -1]), w=torch.rand(8) * 4)
    for _ in range(3):  # zero-init output (then zero-init w head) need a step each to open
        opt.zero_grad()
        (model(z, t, **cond) - z).square().mean().backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead


def test_default_model_for():
    unet = default_model_for((1, 8, 8), num_classes=10)
    assert isinstance(unet, UNet) and unet.config["channel_mults"] == [1, 2]
    assert unet.num_classes == 10
    assert default_model_for((3, 16, 16)).config["channel_mults"] == [1, 2, 2]
    assert default_model_for((3, 32, 32))(torch.randn(1, 3, 32, 32), 0.5).shape == (1, 3, 32, 32)
    assert isinstance(default_model_for((2,)), MLP)
    with pytest.raises(ValueError, match="example_shape"):
        default_model_for((4, 4))


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method:DeprecationWarning")
def test_compiles_fullgraph():
    model = _randomise(_small_unet(num_classes=3, scalar_conds=("w",)))
    z, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    cond = dict(y=torch.tensor([1, -1]), w=torch.rand(2))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(z, t, **cond), model(z, t, **cond))


# --- as_v_model ----------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [None, LinearLogSNRSchedule()])
@pytest.mark.parametrize("kind", ["eps", "x"])
def test_as_v_model_exact_predictor_gives_true_v(kind, schedule):
    sched = schedule or CosineSchedule()
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    t = torch.linspace(0.02, 0.98, 64)  # away from both singular ends
    a, s = sched.alpha(t.double()), sched.sigma(t.double())
    z = (a[:, None] * x.double() + s[:, None] * eps.double()).float()

    def oracle(z_in, t_in, **cond):  # an exact predictor of ε or x for this batch
        assert torch.equal(t_in, t) and cond == {"y": "passed"}
        return eps if kind == "eps" else x

    v_model = as_v_model(oracle, kind, schedule)
    assert v_model.prediction == "v" and v_model.source_prediction == kind
    v = v_model(z, t, y="passed")
    v_true = v_from_x_eps(x.double(), eps.double(), a, s).float()
    torch.testing.assert_close(v, v_true, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("kind", ["eps", "x"])
def test_as_v_model_is_finite_at_singular_ends(kind):
    net = as_v_model(lambda z, t: torch.ones_like(z), kind, delta=1e-3)
    z = torch.randn(2, 4)
    v = net(z, torch.tensor([0.0, 1.0]))
    assert torch.isfinite(v).all()
    assert v.abs().max() < 2.0 / math.sin(1e-3)  # amplification bounded by 1/sin δ
    bf = net(z.bfloat16(), torch.tensor([0.3, 0.6]))
    assert bf.dtype == torch.bfloat16 and torch.isfinite(bf).all()


def test_as_v_model_wraps_module_and_keeps_attributes():
    inner = _randomise(MLP(hidden=16, depth=1, num_classes=2))
    wrapped = as_v_model(inner, "v")
    z, t = torch.randn(3, 2), torch.rand(3)
    assert torch.equal(
        wrapped(z, t, y=torch.tensor([0, 1, -1])), inner(z, t, y=torch.tensor([0, 1, -1]))
    )
    assert wrapped.num_classes == 2 and len(list(wrapped.parameters())) > 0
    with pytest.raises(ValueError, match="prediction"):
        as_v_model(inner, "score")
