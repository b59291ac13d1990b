"""Denoising networks: a compact U-Net for images, a residual MLP for 2-D toy data.

Every fastdiff model follows one call convention (DESIGN.md §4b, CONTRIBUTING.md)::

    model(z, t, **cond) -> v_hat

- ``z``: float tensor ``(B, ...)`` (images ``(B, C, H, W)``, toy data ``(B, D)``), any float
  dtype; the network computes in its parameter dtype and returns ``v_hat`` with ``z``'s shape
  and dtype.
- ``t``: diffusion time in ``[0, 1]``: a float tensor ``(B,)``, a 0-d tensor or a Python float
  (broadcast to the batch).
- ``y``: class labels, int64 ``(B,)``; ``-1`` is the null class (the unconditional branch of
  classifier-free guidance, label dropout) and maps to an extra learned embedding row, the
  last one. ``y=None`` means "all null".
- named scalar conditions (e.g. ``w`` guidance weight, ``steps`` step count): float tensors
  ``(B,)`` (0-d / float broadcast). **A known scalar condition that is not passed (or passed
  as None) is treated as 0**, so a guidance-conditioned student still works for callers that
  do not know about ``w``. An unknown keyword raises ``TypeError`` naming it.

Every model has ``model.config`` (JSON-able ``{"kind": "unet" | "mlp", **constructor
kwargs}``; ``build_model(config)`` rebuilds it), ``model.num_classes``, ``model.scalar_conds``
(tuple of names) and ``model.prediction == "v"``.

Embeddings. Time and scalar conditions go through the same fixed (not learned) Fourier
features: ``[sin(ω_k u), cos(ω_k u)]`` with ``ω_k`` geometric from 1000 down to 0.1 rad per
unit of ``u`` — for ``u = t`` this is the classic "sinusoidal embedding of 1000 t" (periods
from 0.006 to 63 in t). A scalar condition enters as ``u = scale · value``; pick ``scale`` so
that ``scale · value`` spans a few units (``w ∈ [0, 4]``: scale 1; ``steps ∈ [1, 1024]``:
pass ``log2(steps)`` or use scale ≈ 1/200). The features go through a 2-layer MLP; the
time embedding, the class embedding and the scalar embeddings are summed into one vector
that modulates every block.

Initialisation. The output layer is zero-initialised, so a fresh model outputs exactly 0
(a fine start for v-prediction, where the target has unit variance); consequently on the
very first backward pass only the output layer gets a nonzero gradient, every parameter
does from the second step on. The last layer of each scalar-condition MLP is zero-initialised
too, which is what lets ``add_scalar_condition`` leave a trained model's outputs unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.engine.schedules import HALF_PI, CosineSchedule, Schedule, to_v

__all__ = [
    "MLP",
    "CondEmbedding",
    "UNet",
    "VPredictionWrapper",
    "add_scalar_condition",
    "as_v_model",
    "build_model",
    "register_model_kind",
    "default_model_for",
    "fourier_features",
]

# Keywords a scalar condition may not be called: they mean something else in the call.
_RESERVED = {"z", "t", "y", "cond"}


# --- embeddings ---------------------------------------------------------------------------


def fourier_features(u: torch.Tensor, dim: int, max_freq: float = 1000.0, min_freq: float = 0.1):
    """Fixed Fourier features of a per-sample scalar.

    u: float tensor (B,) (unitless; t ∈ [0, 1] or scale · condition). Returns float32
    (B, dim) = [sin(ω_k u), cos(ω_k u)] for dim/2 angular frequencies ω_k geometric from
    `max_freq` down to `min_freq` (rad per unit u). Computed in float32 whatever u's dtype
    (bf16 would alias the high frequencies).
    """
    half = dim // 2
    k = torch.arange(half, device=u.device, dtype=torch.float32)
    # geometric ladder; written with exp/log so it has no Python-float data dependence
    omega = max_freq * torch.exp(-math.log(max_freq / min_freq) * k / max(half - 1, 1))
    arg = u.to(torch.float32)[:, None] * omega[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def _scalar_mlp(fourier_dim: int, emb_dim: int, zero_last: bool) -> nn.Sequential:
    mlp = nn.Sequential(nn.Linear(fourier_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
    if zero_last:
        nn.init.zeros_(mlp[2].weight)
        nn.init.zeros_(mlp[2].bias)
    return mlp


def _scalar_conds_dict(scalar_conds) -> dict[str, float]:
    """Normalise `scalar_conds` (names, (name, scale) pairs or {name: scale}) to {name: scale}."""
    if isinstance(scalar_conds, str):
        raise TypeError(
            f"scalar_conds must be a sequence of names (or a {{name: scale}} mapping), "
            f"not the string {scalar_conds!r}; did you mean ({scalar_conds!r},)?"
        )
    items = scalar_conds.items() if isinstance(scalar_conds, Mapping) else scalar_conds
    out: dict[str, float] = {}
    for item in items:
        name, scale = (item, 1.0) if isinstance(item, str) else item
        _check_cond_name(name)
        if name in out:
            raise ValueError(f"scalar condition {name!r} is listed twice in scalar_conds")
        out[name] = float(scale)
    return out


def _check_cond_name(name) -> None:
    if not isinstance(name, str) or not name.isidentifier() or name in _RESERVED:
        raise ValueError(
            f"scalar condition name must be a Python identifier other than "
            f"{sorted(_RESERVED)}, got {name!r}"
        )


class CondEmbedding(nn.Module):
    """Conditioning embedding added to the time embedding.

    - class labels: ``nn.Embedding(num_classes + 1, emb_dim)``; row ``num_classes`` is the
      null class, used for ``y == -1`` and for ``y=None``. Absent when num_classes == 0.
    - one Fourier-feature MLP per named scalar condition (``self.scalars[name]``), input
      ``scale · value``; a condition that is not passed counts as value 0.

    forward(batch, device, y=None, **scalars) -> float (B, emb_dim) or None when the model
    has no conditioning at all.
    """

    def __init__(self, emb_dim: int, num_classes: int = 0, scalar_conds=(), fourier_dim=64):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.emb_dim = emb_dim
        self.num_classes = num_classes
        self.fourier_dim = fourier_dim
        self.classes = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        self.scalars = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        for name, scale in _scalar_conds_dict(scalar_conds).items():
            # fresh models zero the last layer as well: harmless, and keeps a model built
            # with a condition identical in behaviour to one that gained it later
            self.add(name, scale)

    def add(self, name: str, scale: float = 1.0) -> None:
        """Register a new scalar condition whose embedding is exactly 0 until trained."""
        _check_cond_name(name)
        if name in self.scalars:
            raise ValueError(f"the model already has a scalar condition named {name!r}")
        ref = next(self.parameters(), None)
        mlp = _scalar_mlp(self.fourier_dim, self.emb_dim, zero_last=True)
        if ref is not None:
            mlp = mlp.to(device=ref.device, dtype=ref.dtype)
        self.scalars[name] = mlp
        self.scales[name] = float(scale)

    def check_keywords(self, cond: Mapping) -> None:
        for key in cond:
            if key not in self.scalars:
                known = ["y"] + list(self.scalars)
                raise TypeError(
                    f"unexpected conditioning keyword {key!r}; this model accepts {known} "
                    f"(add a scalar condition with fastdiff.engine.models.add_scalar_condition)"
                )

    def forward(self, batch: int, device, y=None, **scalars):
        self.check_keywords(scalars)
        emb = None
        if self.classes is not None:
            if y is None:
                idx = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            else:
                y = torch.as_tensor(y, device=device).long().reshape(-1).expand(batch)
                if y.device.type == "cpu" and not torch.compiler.is_compiling():
                    # a readable error instead of Embedding's "index out of range"; skipped
                    # on GPU (it would sync every call) and under torch.compile
                    if bool((y >= self.num_classes).any()) or bool((y < -1).any()):
                        raise ValueError(
                            f"class labels y must be in [0, {self.num_classes - 1}] or -1 "
                            f"(null), got {sorted(set(y.tolist()))}"
                        )
                # -1 is the null class: the extra last row
                idx = torch.where(y < 0, torch.full_like(y, self.num_classes), y)
            emb = self.classes(idx)
        elif y is not None:
            raise TypeError(
                "this model is unconditional (num_classes=0) and takes no class labels; "
                "pass y=None or build it with num_classes > 0"
            )
        for name, mlp in self.scalars.items():
            value = scalars.get(name)
            if value is None:
                u = torch.zeros(batch, device=device, dtype=torch.float32)
            else:
                u = _per_batch(value, batch, device, name)
            e = mlp(
                fourier_features(u * self.scales[name], self.fourier_dim).to(mlp[0].weight.dtype)
            )
            emb = e if emb is None else emb + e
        return emb


def _per_batch(value, batch: int, device, name: str) -> torch.Tensor:
    """A per-sample float (B,) from a tensor (B,) / 0-d / Python number."""
    value = torch.as_tensor(value, device=device)
    if not value.is_floating_point():
        value = value.to(torch.float32)
    if value.ndim == 0:
        return value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(
            f"{name} must be a float tensor of shape ({batch},) (one per sample), a 0-d tensor "
            f"or a number; got shape {tuple(value.shape)}"
        )
    return value


class _Conditioned(nn.Module):
    """Shared plumbing: time embedding + CondEmbedding, config bookkeeping, checks."""

    prediction = "v"

    def _init_embedding(self, time_dim: int, emb_dim: int, num_classes: int, scalar_conds):
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.cond = CondEmbedding(emb_dim, num_classes, scalar_conds, fourier_dim=time_dim)

    @property
    def num_classes(self) -> int:
        return self.cond.num_classes

    @property
    def scalar_conds(self) -> tuple[str, ...]:
        return tuple(self.cond.scalars.keys())

    @property
    def config(self) -> dict:
        """JSON-able {"kind", **constructor kwargs}; `build_model` rebuilds the model."""
        return {
            "kind": self.kind,
            **self._kwargs,
            "num_classes": self.num_classes,
            "scalar_conds": dict(self.cond.scales),
        }

    def _embed(self, z: torch.Tensor, t, cond: dict) -> torch.Tensor:
        batch = z.shape[0]
        t = _per_batch(t, batch, z.device, "t")
        emb = self.time_mlp(fourier_features(t, self.time_dim).to(self.time_mlp[0].weight.dtype))
        c = self.cond(batch, z.device, **cond)
        return emb if c is None else emb + c


# --- U-Net ---------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3 → GroupNorm·(1+scale)+shift (from the embedding) → SiLU →
    dropout → conv3×3, plus a (1×1 conv when channels change) skip. (B, c_in, H, W) →
    (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions (heads of 32 channels), residual."""

    def __init__(self, channels: int, groups: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(_Conditioned):
    """Compact U-Net predicting v for images (B, C, H, W).

    Levels: one per entry of `channel_mults` (width channels·mult); each level has
    `num_res_blocks` ResBlocks, a stride-2 conv between levels on the way down and
    nearest-upsample + conv on the way up, skip connections from every down block to the
    matching up block, and a middle ResBlock → (self-attention if `attention`) → ResBlock
    at the lowest resolution (4×4 for the 8×8 default). H and W must be divisible by
    2^(levels−1). Embedding width 4·channels; time features `channels` wide.
    """

    kind = "unet"

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        channels: int = 32,
        channel_mults=(1, 2),
        num_res_blocks: int = 2,
        attention: bool = True,
        num_classes: int = 0,
        scalar_conds=(),
        dropout: float = 0.0,
        groups: int = 8,
    ):
        super().__init__()
        channel_mults = tuple(int(m) for m in channel_mults)
        if not channel_mults:
            raise ValueError("channel_mults must have at least one level")
        self.factor = 2 ** (len(channel_mults) - 1)
        if image_size % self.factor:
            raise ValueError(
                f"image_size={image_size} must be divisible by 2^(levels-1) = {self.factor} "
                f"for channel_mults={channel_mults} ({len(channel_mults)} levels)"
            )
        for m in channel_mults:
            if (channels * m) % groups:
                raise ValueError(
                    f"every level width channels*mult must be divisible by groups={groups}; "
                    f"got channels={channels}, mult={m}"
                )
        self._kwargs = dict(
            in_channels=in_channels, image_size=image_size, channels=channels,
            channel_mults=list(channel_mults), num_res_blocks=num_res_blocks,
            attention=bool(attention), dropout=float(dropout), groups=groups,
        )  # fmt: skip
        self.in_channels = in_channels
        emb_dim = 4 * channels
        self._init_embedding(channels, emb_dim, num_classes, scalar_conds)

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        block = lambda a, b: ResBlock(a, b, emb_dim, groups, dropout)
        self.down = nn.ModuleList()
        skips = [channels]
        ch = channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, channels * mult))
                ch = channels * mult
                skips.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)
        self.mid1 = block(ch, ch)
        self.mid_attn = Attention(ch, groups) if attention else nn.Identity()
        self.mid2 = block(ch, ch)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), channels * mult))
                ch = channels * mult
            if level > 0:
                self.up.append(_Upsample(ch))
        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        """z (B, C, H, W) any float dtype, t (B,) in [0, 1] → v̂ of z's shape and dtype."""
        if z.ndim != 4 or z.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects z of shape (B, {self.in_channels}, H, W), got {tuple(z.shape)}"
            )
        if z.shape[2] % self.factor or z.shape[3] % self.factor:
            raise ValueError(
                f"UNet with {self.factor}x downsampling needs H and W divisible by "
                f"{self.factor}, got z of shape {tuple(z.shape)}"
            )
        emb = self._embed(z, t, cond)
        h = self.conv_in(z.to(self.conv_in.weight.dtype))
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h))).to(z.dtype)


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# --- MLP -----------------------------------------------------------------------------------


class _MLPBlock(nn.Module):
    """x + W₂ SiLU(W₁ LayerNorm(x) + E emb): a pre-norm residual block. (B, H) → (B, H)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x, emb):
        return x + self.fc2(F.silu(self.fc1(self.norm(x)) + self.emb(F.silu(emb))))


class MLP(_Conditioned):
    """Residual MLP predicting v for vectors z (B, dim) (2-D toy data by default).

    `depth` pre-norm residual blocks of width `hidden`, each told the (time + conditioning)
    embedding; zero-initialised output layer.
    """

    kind = "mlp"

    def __init__(
        self, dim: int = 2, hidden: int = 256, depth: int = 4, num_classes: int = 0, scalar_conds=()
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._kwargs = dict(dim=dim, hidden=hidden, depth=depth)
        self.dim = dim
        self._init_embedding(min(hidden, 128), hidden, num_classes, scalar_conds)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(_MLPBlock(hidden) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        """z (B, dim) any float dtype, t (B,) in [0, 1] → v̂ (B, dim) in z's dtype."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"MLP expects z of shape (B, {self.dim}), got {tuple(z.shape)}")
        emb = self._embed(z, t, cond)
        h = self.inp(z.to(self.inp.weight.dtype))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.norm_out(h))).to(z.dtype)


# --- building, conditioning surgery --------------------------------------------------------

MODEL_KINDS = {"unet": UNet, "mlp": MLP}


def register_model_kind(kind: str, builder: Callable[..., nn.Module]) -> None:
    """Let `build_model` (and so `fastdiff.load`) rebuild models of another `kind`.

    `builder(**config_without_kind) -> nn.Module` rebuilds the model from its `.config`;
    a model's own layer registers it where it is defined (fastdiff.integrations.diffusers
    registers "diffusers" when it is imported, which `import fastdiff` does), so the
    engine never imports a higher layer. Registering a kind again with another builder
    raises ValueError.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"model kind must be a non-empty string, got {kind!r}")
    if MODEL_KINDS.get(kind, builder) is not builder:
        raise ValueError(f"model kind {kind!r} is already registered")
    MODEL_KINDS[kind] = builder


def build_model(config: Mapping) -> nn.Module:
    """Rebuild a model from its `.config` ({"kind": "unet" | "mlp" | a registered kind,
    **constructor kwargs}; see `register_model_kind`)."""
    if not isinstance(config, Mapping) or "kind" not in config:
        raise ValueError(f"model config must be a dict with a 'kind' key, got {config!r}")
    config = dict(config)
    kind = config.pop("kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODEL_KINDS)}"
                         + (" (import fastdiff.integrations.diffusers, which registers it)"
                            if kind == "diffusers" else ""))
    try:
        return MODEL_KINDS[kind](**config)
    except TypeError as e:  # an unknown / misspelt constructor argument
        raise ValueError(f"bad {kind!r} model config {config!r}: {e}") from e


def add_scalar_condition(model: nn.Module, name: str, *, scale: float = 1.0) -> nn.Module:
    """Give `model` a new scalar condition `name` IN PLACE and return it.

    The condition's embedding MLP ends in a zero-initialised layer, so the model's outputs
    are bit-for-bit unchanged (for any value of the new condition) until it trains. The
    condition is recorded in `model.config["scalar_conds"]` (with `scale`), so a saved
    checkpoint rebuilds it. `scale` multiplies the value before the Fourier features.

    A model of another family may implement the same contract itself as a method
    `model.add_scalar_condition(name, *, scale)` (outputs unchanged until trained, `name`
    listed in `model.scalar_conds` afterwards, rebuilt by its saved config); it is called
    instead (a diffusers UNet gains `w` through its guidance embedding that way).
    """
    own = getattr(model, "add_scalar_condition", None)
    if callable(own):
        own(name, scale=scale)
        return model
    cond = getattr(model, "cond", None)
    if not isinstance(cond, CondEmbedding):
        raise TypeError(
            f"add_scalar_condition needs a fastdiff model (UNet or MLP), got {type(model).__name__}"
        )
    cond.add(name, scale)
    return model


def default_model_for(example_shape, num_classes: int = 0) -> nn.Module:
    """A small, CPU-cheap model for examples of `example_shape` (without the batch axis).

    (C, H, W) → UNet(channels=32, 2 res blocks, attention), levels chosen so the lowest
    resolution is ≥ 4 (8×8 → mults (1, 2); 16×16 → (1, 2, 2); 32×32 → (1, 2, 2, 2));
    (D,) → MLP(dim=D, hidden=256, depth=4).
    """
    shape = tuple(int(s) for s in example_shape)
    if len(shape) == 1:
        return MLP(dim=shape[0], num_classes=num_classes)
    if len(shape) == 3:
        c, h, w = shape
        size = min(h, w)
        mults = [1]
        while len(mults) < 4 and size % 2 == 0 and size // 2 >= 4 and w % (2 ** len(mults)) == 0:
            mults.append(2)
            size //= 2
        return UNet(
            in_channels=c, image_size=h, channel_mults=tuple(mults), num_classes=num_classes
        )
    raise ValueError(f"example_shape must be (C, H, W) for images or (D,) for vectors, got {shape}")


# --- wrapping user models ------------------------------------------------------------------


class VPredictionWrapper(nn.Module):
    """A model predicting ε or x, seen as a v-predictor (see `as_v_model`)."""

    prediction = "v"

    def __init__(self, inner, source_prediction: str, schedule: Schedule, delta: float):
        super().__init__()
        if isinstance(inner, nn.Module):
            self.inner = inner
        else:
            self._inner_fn = inner  # a plain callable: not a submodule
        self.source_prediction = source_prediction
        self.schedule = schedule
        self.delta = float(delta)

    @property
    def model(self) -> Callable:
        return self.inner if "inner" in self._modules else self._inner_fn

    @property
    def num_classes(self) -> int:
        return getattr(self.model, "num_classes", 0)

    @property
    def scalar_conds(self) -> tuple:
        return tuple(getattr(self.model, "scalar_conds", ()))

    def forward(self, z: torch.Tensor, t, **cond) -> torch.Tensor:
        t = _per_batch(t, z.shape[0], z.device, "t")
        out = self.model(z, t, **cond)
        if self.source_prediction == "v":
            return out
        # the schedule's angle in float64, kept off the singular end of this prediction kind
        phi = self.schedule.phi(t.to(torch.float64))
        phi = phi.clamp(self.delta, HALF_PI - self.delta)
        alpha, sigma = torch.cos(phi), torch.sin(phi)
        work = z.dtype if z.dtype in (torch.float32, torch.float64) else torch.float32
        v = to_v(out.to(work), z.to(work), self.source_prediction, alpha, sigma)
        return v.to(z.dtype)


def as_v_model(
    model, prediction: str = "eps", schedule: Schedule | None = None, *, delta: float = 1e-3
) -> nn.Module:
    """Wrap a model (nn.Module or callable `f(z, t, **cond)`) that predicts ε or x so that it
    predicts v = α ε − σ x, the fastdiff convention.

    Conversion (α = cos φ(t), σ = sin φ(t) from `schedule`, default cosine; coefficients in
    float64, applied in z's dtype — float32 for half-precision z): ε-prediction
    v = (ε̂ − σ z)/α, x-prediction v = (α z − x̂)/σ.

    Singular ends: ε-prediction is singular at α = 0 (t = 1 on the cosine schedule), where ε
    carries no information on x; x-prediction at σ = 0 (t = 0), where z = x carries none on
    ε. The rule: the angle used for the conversion is clamped into [δ, π/2 − δ] (δ = `delta`
    rad, default 1e-3), so the output stays finite (error amplification ≤ 1/sin δ ≈ 1000)
    while the wrapped model still receives the true t. Away from the ends (φ inside
    [δ, π/2 − δ]) the conversion is exact.

    The wrapper has `.prediction == "v"` (what it outputs), `.source_prediction` (what the
    wrapped model outputs), `.schedule`, `.num_classes`/`.scalar_conds` taken from the wrapped
    model when it has them, and passes every conditioning keyword through. prediction="v"
    wraps without conversion.
    """
    if prediction not in ("eps", "x", "v"):
        raise ValueError(f"prediction must be 'eps', 'x' or 'v', got {prediction!r}")
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a callable f(z, t, **cond), got {model!r}")
    if not 0.0 < delta < HALF_PI / 2:
        raise ValueError(f"delta must be in (0, π/4), got {delta}")
    return VPredictionWrapper(model, prediction, schedule or CosineSchedule(), delta)


def checked_output(model: Callable, role: str = "model") -> Callable:
    """`model`, raising one clear TypeError/ValueError where its output is not a
    v-prediction tensor of z's shape (a tuple, a dict, a diffusers output object) instead of
    failing deep inside a step, loss or kernel. `role` names it in the message."""

    def checked(z, t, **cond):
        out = model(z, t, **cond)
        if not torch.is_tensor(out):
            raise TypeError(
                f"the {role} returned a {type(out).__name__}, not a tensor: fastdiff needs "
                f"{role}(z, t, **cond) -> v of z's shape {tuple(z.shape)}; wrap it, e.g. "
                f"lambda z, t, **c: {role}(z, t, **c)[0]")
        if out.shape != z.shape:
            raise ValueError(f"the {role} returned shape {tuple(out.shape)}; fastdiff needs "
                             f"v of z's shape {tuple(z.shape)}")
        return out

    return checked
