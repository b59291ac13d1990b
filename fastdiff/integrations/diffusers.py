"""Hugging Face diffusers models as fastdiff teachers, and distilled students back as diffusers.

    teacher = from_diffusers(unet, scheduler)            # UNet2DModel / UNet2DConditionModel
    result = distill_round(teacher, data, teacher_steps=8, ...)   # any fastdiff method
    export_diffusers(result.student, "student", steps=result.steps)
    # DDIMPipeline.from_pretrained("student")(num_inference_steps=result.steps) samples it

## Time mapping (the contract that makes both samplers agree)

A diffusers model is trained on integer timesteps k = 0 … T−1 with ᾱ_k = `alphas_cumprod[k]`
(α_k = √ᾱ_k, σ_k = √(1−ᾱ_k), φ_k = atan2(σ_k, α_k)). fastdiff's time is continuous,
t ∈ [0, 1]. The map is

    s(t) = T·t,    node j = 0 … T,    model timestep k = s − 1,
    node j ≥ 1 is timestep k = j − 1 (ᾱ = alphas_cumprod[j−1]);
    node 0 (t = 0) is the end point ᾱ = `final_alpha_cumprod` (1 by default: φ = 0, clean data).

This is diffusers' DDIMScheduler with `timestep_spacing="trailing"`: for N steps with T % N == 0
it visits k_i = T − 1 − i·T/N, i = 0 … N−1, and steps from k_i to k_i − T/N, the last step
ending at `final_alpha_cumprod`. fastdiff's uniform grid t_i = 1 − i/N lands on exactly those
nodes (s = T − i·T/N), so `sample(teacher, noise, N)` and diffusers' DDIM loop take the same
steps, with the same angles and the same network inputs. ("leading"/"linspace" spacings give a
grid that depends on N and does not start at k = T−1; no single t ↦ k map reproduces them.)

Between nodes j < s < j+1 (f = s − j), log-SNR λ = log(ᾱ/(1−ᾱ)) is interpolated linearly in s,
φ = atan(exp(−λ/2)); on a segment with an infinite end (ᾱ = 1 at t = 0, or ᾱ = 0 for a
zero-terminal-SNR schedule) φ itself is interpolated linearly instead. At a node the tabulated
φ_j is returned exactly. The network receives the fractional timestep k = s − 1, clamped to
k ≥ 0 (it never saw negative timesteps; only t < 1/T, never evaluated by samplers, is
affected). A float32 t (what samplers hand to models) is snapped to the node when s is within
T·2⁻²² of an integer, so t = i/N rounded to float32 still hits the integer timestep exactly.

## Prediction types

The wrapper outputs fastdiff's v = α ε − σ x (equal to diffusers' `v_prediction` target at the
same ᾱ). ε-prediction: v = (ε̂ − σ z)/α; sample (x-) prediction: v = (α z − x̂)/σ; v_prediction:
unchanged. Conversions run in float64 with α and σ floored at sin(1e-4) (the angle clamped into
[1e-4, π/2 − 1e-4] rad), so the output stays finite at ᾱ = 0 or 1; every node of an ordinary
schedule lies inside that range and converts exactly.

## Conditioning

`y` (int64 (B,), −1 = null class) goes to the UNet as `class_labels` when it has a class
embedding table (`num_class_embeds`). diffusers has no null class of its own: train the
teacher with one extra embedding row for "no label" and pass its index as `null_class`
(it must be the last row, so labels are 0 … num_class_embeds − 2). Without `null_class`, y = −1
raises. A class-conditional UNet called without `y` gets the null class. `encoder_hidden_states`
(B, L, D) and other UNet keywords (`added_cond_kwargs`, …) are passed through; a fixed
`encoder_hidden_states` given to `from_diffusers` (e.g. one prompt's embedding, (1, L, D)) is
used, broadcast over the batch, when a call passes none.

## Stable-Diffusion-style (latent, text-conditional) teachers

`load_diffusers_teacher(folder)` takes a pipeline folder (model_index.json, unet/, scheduler/;
vae/, text_encoder/, tokenizer/ optional; DDPM, DDIM, PNDM or Euler scheduler configs, ε-,
x- or v-prediction). Its examples are latents (already × the VAE's `scaling_factor`); each
example's prompt embedding (L, D) reaches the UNet as `encoder_hidden_states` (B, L, D),
carried by the data set (`fastdiff.engine.data`: a `.npz` with latents, prompt_embeds and
negative_prompt_embeds; `encode_folder` / `fastdiff encode` builds one). Classifier-free
guidance's null condition is the negative / empty prompt's embedding (the data set's
`null_conds`), so `v̂^w = (1 + w) v̂(z, e) − w v̂(z, e_neg)`, diffusers' `guidance_scale`
being 1 + w. Guided stage 1 gives the student w through diffusers' own guidance embedding
(`time_cond_proj_dim`, `guidance_embedding`), in a zero-initialised `cond_proj`, so it
starts as the teacher; `export_pipeline` writes a StableDiffusionPipeline folder that runs
the student with one UNet pass per step at `guidance_scale = 1 + w`.

## Saving

A DiffusersTeacher (and every student copied from it) saves with `fastdiff.save` and loads
with `fastdiff.load` like a native model: its `config` has kind "diffusers", which this
module registers with `fastdiff.engine.models.register_model_kind` (and its schedule with
`register_schedule`) on import — `import fastdiff` imports it — so the engine, a lower
layer, never imports this one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fastdiff.engine.checkpoint import CheckpointError, atomic_dir
from fastdiff.engine.models import register_model_kind
from fastdiff.engine.schedules import Schedule, _as_tensor, register_schedule, to_v

__all__ = [
    "DiffusersFolderError",
    "DiffusersSchedule",
    "DiffusersTeacher",
    "export_diffusers",
    "encode_folder",
    "export_pipeline",
    "export_scheduler",
    "from_diffusers",
    "guidance_embedding",
    "load_diffusers_teacher",
]

INSTALL_HINT = "pip install fastdiff[diffusers]"
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
# diffusers' names and fastdiff's kinds (fastdiff.engine.schedules.to_v)
PREDICTION_KINDS = {"epsilon": "eps", "sample": "x", "v_prediction": "v"}
_ALIASES = {"eps": "epsilon", "x": "sample", "v": "v_prediction"}
CONVERSION_DELTA = 1e-4  # rad: the conversion angle is clamped into [δ, π/2 − δ]
FASTDIFF_JSON = "fastdiff.json"
FORMAT = "fastdiff.diffusers-export"
WEIGHTS = "diffusion_pytorch_model.safetensors"
MODEL_KIND = "diffusers"          # fastdiff.save's config kind (engine.models.build_model)
GUIDANCE_COND = "w"               # the scalar condition a UNet gets through time_cond_proj_dim
GUIDANCE_EMBED_DIM = 256          # time_cond_proj_dim given to a UNet that gains w (as LCM)


class DiffusersFolderError(CheckpointError):
    """A diffusers folder that cannot be loaded or written; the message names the path."""


def _diffusers():
    """The diffusers package, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - exercised in a subprocess test
        raise ImportError(
            f"fastdiff.integrations.diffusers needs the diffusers package: {INSTALL_HINT}"
        ) from e
    return diffusers


def _prediction_name(prediction_type: str, where: str) -> str:
    name = _ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_KINDS:
        raise ValueError(f"{where}: unknown prediction_type {prediction_type!r}; expected one of "
                         f"{sorted(PREDICTION_KINDS)} (or 'eps', 'x', 'v')")
    return name


# --- the schedule ----------------------------------------------------------------------------


class DiffusersSchedule(Schedule):
    """A discrete diffusers schedule as a fastdiff angle schedule φ(t) (see the module doc).

    alphas_cumprod: ᾱ_k for k = 0 … T−1 (T ≥ 2), strictly decreasing, in [0, 1];
    final_alpha_cumprod: ᾱ at t = 0 (diffusers' DDIM `final_alpha_cumprod`: 1 when
    `set_alpha_to_one`, else ᾱ_0), ≥ ᾱ_0. Tables are float64; so are results.
    """

    name = "diffusers"

    def __init__(self, alphas_cumprod, final_alpha_cumprod: float = 1.0):
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        final = float(final_alpha_cumprod)
        if a.numel() < 2:
            raise ValueError(f"alphas_cumprod needs at least 2 timesteps, got {a.numel()}")
        if not (torch.all(a >= 0) and torch.all(a <= 1)) or not 0 <= final <= 1:
            raise ValueError("alphas_cumprod and final_alpha_cumprod must lie in [0, 1]")
        if not torch.all(a[1:] < a[:-1]):
            raise ValueError("alphas_cumprod must be strictly decreasing in the timestep")
        if final < a[0]:
            raise ValueError(f"final_alpha_cumprod ({final}) must be >= alphas_cumprod[0] "
                             f"({float(a[0])})")
        self.alphas_cumprod = a
        self.final_alpha_cumprod = final
        self.T = a.numel()
        ab = torch.cat([torch.tensor([final], dtype=torch.float64), a])  # node j = 0 … T
        self._phi = torch.atan2(torch.sqrt(1 - ab), torch.sqrt(ab))
        with torch.no_grad():
            self._lam = torch.log(ab) - torch.log1p(-ab)  # ±inf where ᾱ is 1 or 0

    @property
    def config(self) -> dict:
        return {"name": self.name, "alphas_cumprod": self.alphas_cumprod.tolist(),
                "final_alpha_cumprod": self.final_alpha_cumprod}

    def node_position(self, t) -> torch.Tensor:
        """s = T·t ∈ [0, T] (float64), snapped to an integer within T·2⁻²² of one."""
        s = _as_tensor(t).to(torch.float64).clamp(0.0, 1.0) * self.T
        r = torch.round(s)
        return torch.where((s - r).abs() <= self.T * 2.0**-22, r, s)

    def timestep(self, t) -> torch.Tensor:
        """The diffusers timestep k(t) = T·t − 1 fed to the network (float64, clamped ≥ 0)."""
        return (self.node_position(t) - 1.0).clamp(min=0.0)

    def phi(self, t) -> torch.Tensor:
        s = self.node_position(t)
        phis, lams = self._phi.to(s.device), self._lam.to(s.device)
        j = torch.floor(s).clamp(0, self.T - 1).long()
        f = s - j
        p0, p1, l0, l1 = phis[j], phis[j + 1], lams[j], lams[j + 1]
        finite = torch.isfinite(l0) & torch.isfinite(l1)
        lam = torch.where(finite, l0 + f * (l1 - l0), torch.zeros_like(s))
        by_lam = torch.atan(torch.exp(-0.5 * lam))
        by_phi = p0 + f * (p1 - p0)
        out = torch.where(finite, by_lam, by_phi)
        return torch.where(f == 0, p0, out)

    def t_from_phi(self, phi) -> torch.Tensor:
        phi = _as_tensor(phi).to(torch.float64)
        phis, lams = self._phi.to(phi.device), self._lam.to(phi.device)
        phi = phi.clamp(float(phis[0]), float(phis[-1]))
        j = (torch.searchsorted(phis, phi, right=True) - 1).clamp(0, self.T - 1)
        p0, p1, l0, l1 = phis[j], phis[j + 1], lams[j], lams[j + 1]
        finite = torch.isfinite(l0) & torch.isfinite(l1)
        lam = -2.0 * torch.log(torch.tan(phi))
        # flat segments (ᾱ_final = ᾱ_0) have zero denominators: any f maps to the same φ, use 0
        by_lam = finite & (l1 != l0)
        f_lam = (lam - l0) / torch.where(by_lam, l1 - l0, torch.ones_like(l0))
        by_phi = ~finite & (p1 > p0)
        f_phi = (phi - p0) / torch.where(by_phi, p1 - p0, torch.ones_like(p0))
        zero = torch.zeros_like(phi)
        f = torch.where(by_lam, f_lam, torch.where(by_phi, f_phi, zero)).clamp(0.0, 1.0)
        return (j + f) / self.T

    def __repr__(self) -> str:
        return (f"DiffusersSchedule(T={self.T}, final_alpha_cumprod={self.final_alpha_cumprod}, "
                f"alphas_cumprod[-1]={float(self.alphas_cumprod[-1]):.3g})")


def _scheduler_and_config(scheduler_or_config, where: str):
    """(alphas_cumprod float32-exact as float64, final ᾱ, plain config dict)."""
    diffusers = _diffusers()
    if isinstance(scheduler_or_config, Mapping):
        config = dict(scheduler_or_config)
        name = config.get("_class_name", "DDPMScheduler")
        cls = getattr(diffusers, name, None)
        if not str(name).endswith("Scheduler") or not hasattr(cls, "from_config"):
            raise ValueError(f"{where}: _class_name {name!r} is not a diffusers scheduler")
        try:
            scheduler = cls.from_config(config)
        except Exception as e:  # diffusers raises many kinds on bad configs
            raise ValueError(f"{where}: cannot build {name} from the config: {e}") from e
    else:
        scheduler = scheduler_or_config
        config = dict(getattr(scheduler, "config", {}) or {})
        config.setdefault("_class_name", type(scheduler).__name__)
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"{where}: {type(scheduler).__name__} has no alphas_cumprod; expected a "
                         "discrete-time scheduler such as DDPMScheduler or DDIMScheduler")
    final = getattr(scheduler, "final_alpha_cumprod", None)
    final = 1.0 if final is None else float(final)  # DDPM: the chain ends at clean data
    config = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
    return torch.as_tensor(ac).to(torch.float64), final, config


# --- the guidance-weight embedding ---------------------------------------------------------


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The embedding of the guidance weight w that a UNet with `time_cond_proj_dim = dim`
    receives as `timestep_cond`: float32 (B, dim) from w float (B,).

    This is diffusers' own guidance-scale embedding, computed by its StableDiffusionPipeline
    from `guidance_scale − 1` (LCM students use it), so a student distilled with w here runs
    in a stock pipeline at `guidance_scale = 1 + w`: with u = 1000 w and half = dim // 2,
    `[sin(u ω_k), cos(u ω_k)]`, ω_k = exp(−k log(10000) / (half − 1)), k < half, float32,
    zero-padded to an odd dim.
    """
    w = torch.as_tensor(w).reshape(-1).to(torch.float32) * 1000.0
    half = dim // 2
    freq = torch.log(torch.tensor(10000.0)) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -freq).to(w.device)
    arg = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


# --- the teacher / student wrapper -----------------------------------------------------------


class DiffusersTeacher(nn.Module):
    """A diffusers UNet as a fastdiff v-prediction model `model(z, t, **cond) -> v̂`.

    z: float (B, C, H, W); t: float (B,) or 0-d in [0, 1]; returns v̂ of z's shape and dtype.
    Attributes: `unet` (the trainable diffusers module), `schedule` (DiffusersSchedule),
    `prediction_type` (diffusers name of what `unet` outputs), `null_class`, `num_classes`,
    `scheduler_config` (the source scheduler's config, used by `export_diffusers`),
    `source` (the pipeline folder it came from: `export_pipeline` copies its VAE, text
    encoder and tokenizer). `copy.deepcopy` gives an independent, trainable copy (how
    fastdiff's methods make students).

    Conditions (keywords of `forward`): `y` (class labels, see the module doc);
    `encoder_hidden_states` float (B, L, D) (or (1, L, D), broadcast) for a
    UNet2DConditionModel, D = its cross_attention_dim; `w` float (B,) (0-d / number
    broadcast; absent = 0), the guidance weight, once the UNet has a guidance embedding
    (`add_scalar_condition("w")`, or a UNet with `time_cond_proj_dim` already): it enters as
    `timestep_cond = guidance_embedding(w, time_cond_proj_dim)`, exactly as diffusers'
    StableDiffusionPipeline feeds `guidance_scale − 1`. Other keywords go to the UNet.

    `config` ({"kind": "diffusers", ...}) lets `fastdiff.save` / `fastdiff.load` rebuild it
    (this module registers the kind with `fastdiff.engine.models.register_model_kind`).
    """

    def __init__(self, unet: nn.Module, schedule: DiffusersSchedule, *, prediction_type: str,
                 null_class: int | None = None, encoder_hidden_states=None,
                 scheduler_config: dict | None = None, source: str | None = None):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = _prediction_name(prediction_type, "DiffusersTeacher")
        self.scheduler_config = dict(scheduler_config or {})
        self.source = None if source is None else str(source)
        cfg = getattr(unet, "config", {}) or {}
        n_embeds = cfg.get("num_class_embeds") if cfg.get("class_embed_type") is None else None
        self.num_class_embeds = int(n_embeds or 0)
        if null_class is not None:
            if not self.num_class_embeds:
                raise ValueError("null_class is set, but the UNet has no class embedding table "
                                 "(config.num_class_embeds is None)")
            if int(null_class) != self.num_class_embeds - 1:
                raise ValueError(f"null_class must be the last class-embedding row "
                                 f"({self.num_class_embeds - 1}), got {null_class}")
            null_class = int(null_class)
        self.null_class = null_class
        self.num_classes = self.num_class_embeds - (null_class is not None)
        if encoder_hidden_states is not None:
            ehs = torch.as_tensor(encoder_hidden_states)
            self.register_buffer("default_encoder_hidden_states",
                                 ehs if ehs.ndim == 3 else ehs[None])
        else:
            self.default_encoder_hidden_states = None

    @property
    def is_conditional_unet(self) -> bool:
        return type(self.unet).__name__ == "UNet2DConditionModel"

    @property
    def guidance_dim(self) -> int | None:
        """The UNet's `time_cond_proj_dim` (the guidance embedding's size), or None."""
        cfg = getattr(self.unet, "config", {}) or {}
        dim = cfg.get("time_cond_proj_dim") if self.is_conditional_unet else None
        return None if dim is None else int(dim)

    @property
    def scalar_conds(self) -> tuple[str, ...]:
        """("w",) when the UNet has a guidance embedding (time_cond_proj_dim), else ()."""
        return (GUIDANCE_COND,) if self.guidance_dim is not None else ()

    def add_scalar_condition(self, name: str, *, scale: float = 1.0,
                             dim: int = GUIDANCE_EMBED_DIM) -> DiffusersTeacher:
        """Give the UNet the guidance weight `w` IN PLACE (the hook
        `fastdiff.engine.models.add_scalar_condition` calls; guided stage 1 uses it).

        A UNet2DConditionModel gains diffusers' own guidance input: `time_cond_proj_dim = dim`
        in its config and `time_embedding.cond_proj`, a bias-free Linear(dim, C) with zero
        weights, so the outputs are bit-for-bit unchanged for every w until it trains, and
        the exported UNet is what StableDiffusionPipeline feeds `guidance_scale − 1`. Only
        `name="w"` with `scale=1` (the pipeline's embedding has its own fixed scale).
        """
        if name != GUIDANCE_COND:
            raise ValueError(f"a diffusers UNet takes one scalar condition, the guidance weight "
                             f"{GUIDANCE_COND!r} (through time_cond_proj_dim); got {name!r}")
        if float(scale) != 1.0:
            raise ValueError(f"w_scale must be 1 for a diffusers UNet (diffusers embeds "
                             f"guidance_scale − 1 with its own fixed scale), got {scale}")
        if not self.is_conditional_unet:
            raise ValueError("the guidance weight w enters a diffusers UNet through "
                             "time_cond_proj_dim, which only UNet2DConditionModel has; got "
                             f"{type(self.unet).__name__}")
        if self.guidance_dim is not None:
            raise ValueError(f"the UNet already has a guidance embedding "
                             f"(time_cond_proj_dim={self.guidance_dim})")
        emb = self.unet.time_embedding
        ref = emb.linear_1.weight
        proj = nn.Linear(int(dim), emb.linear_1.in_features, bias=False)
        nn.init.zeros_(proj.weight)
        emb.cond_proj = proj.to(device=ref.device, dtype=ref.dtype)
        # where diffusers' own constructor puts it (right after linear_1), so that this UNet
        # lists its parameters in the order of one built from the config (`fastdiff.load`):
        # optimizer state is saved and restored by parameter position
        order = ["linear_1", "cond_proj"]
        emb._modules = {k: emb._modules[k] for k in
                        order + [k for k in emb._modules if k not in order]}
        self.unet.register_to_config(time_cond_proj_dim=int(dim))
        return self

    def enable_gradient_checkpointing(self) -> DiffusersTeacher:
        """diffusers' own gradient checkpointing of the UNet (recompute activations in the
        backward pass: less memory, about one more forward per update). Only a module that
        gets gradients pays for it: a frozen teacher under no_grad runs as before, and the
        students copied from it (`copy.deepcopy`) inherit it."""
        self.unet.enable_gradient_checkpointing()
        return self

    @property
    def config(self) -> dict:
        """JSON-able {"kind": "diffusers", ...}: what `fastdiff.load` rebuilds this from
        (the UNet's class and config, the scheduler config, prediction type, null class,
        source folder, the fixed encoder_hidden_states' shape); the weights (and a guidance
        embedding's `cond_proj`) are in the state dict."""
        unet_config = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
        ehs = self.default_encoder_hidden_states
        return {"kind": MODEL_KIND, "unet_class": type(self.unet).__name__,
                "unet_config": json.loads(json.dumps(unet_config, default=list)),
                "scheduler_config": json.loads(json.dumps(self.scheduler_config, default=list)),
                "prediction_type": self.prediction_type, "null_class": self.null_class,
                "source": self.source,
                "encoder_hidden_states_shape": None if ehs is None else list(ehs.shape)}

    @property
    def example_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent / image the UNet takes (from its config)."""
        cfg = self.unet.config
        size = cfg.get("sample_size")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg["in_channels"]), int(h), int(w))

    def _check_text(self, ehs: torch.Tensor, batch: int) -> None:
        dim = self.unet.config.get("cross_attention_dim")
        if ehs.ndim != 3 or ehs.shape[0] not in (1, batch) or (
                isinstance(dim, int) and ehs.shape[-1] != dim):
            want = f"(B={batch} or 1, L, {dim if isinstance(dim, int) else 'D'})"
            raise ValueError(f"encoder_hidden_states has shape {tuple(ehs.shape)}; this "
                             f"UNet2DConditionModel needs {want} (cross_attention_dim {dim})")

    def _class_labels(self, y, batch: int, device):
        if not self.num_class_embeds:
            if y is None:
                return None
            raise ValueError("y was given, but the UNet has no class embedding "
                             "(config.num_class_embeds is None)")
        if y is None:
            if self.null_class is None:
                raise ValueError("this class-conditional UNet needs y (int64 (B,)); pass "
                                 "null_class to from_diffusers to allow unconditional calls")
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        y = torch.as_tensor(y, device=device).long().expand(batch)
        if torch.any(y == -1):
            if self.null_class is None:
                raise ValueError("y contains -1 (the null class), but this teacher has no "
                                 "null_class; train with an extra 'no label' embedding row and "
                                 "pass its index as null_class")
            y = torch.where(y == -1, torch.full_like(y, self.null_class), y)
        if torch.any((y < 0) | (y >= self.num_class_embeds)):
            raise ValueError(f"class labels must be in [0, {self.num_classes}) or -1")
        return y

    def forward(self, z: torch.Tensor, t, y=None, **cond) -> torch.Tensor:
        batch = z.shape[0]
        t = torch.as_tensor(t, device=z.device)
        t = t.expand(batch) if t.ndim == 0 else t
        k = self.schedule.timestep(t)
        phi = self.schedule.phi(t)
        kwargs = dict(cond)
        dtype = getattr(self.unet, "dtype", z.dtype)
        w = kwargs.pop(GUIDANCE_COND, None)
        if self.guidance_dim is not None:
            w = torch.zeros(batch, device=z.device) if w is None else \
                torch.as_tensor(w, device=z.device).reshape(-1).expand(batch)
            kwargs["timestep_cond"] = guidance_embedding(w, self.guidance_dim).to(dtype)
        elif w is not None:
            raise TypeError("unexpected conditioning keyword 'w': this UNet has no guidance "
                            "embedding (add_scalar_condition('w'), as guided stage 1 does)")
        labels = self._class_labels(y, batch, z.device)
        if labels is not None:
            kwargs["class_labels"] = labels
        if self.is_conditional_unet:
            ehs = kwargs.get("encoder_hidden_states")
            if ehs is None:
                ehs = self.default_encoder_hidden_states
                if ehs is None:
                    raise ValueError("UNet2DConditionModel needs encoder_hidden_states: pass "
                                     "it as a keyword, or give a fixed one to from_diffusers")
            self._check_text(ehs, batch)
            kwargs["encoder_hidden_states"] = ehs.expand(batch, *ehs.shape[1:]).to(dtype)
        out = self.unet(z.to(dtype), k.to(torch.float32), return_dict=False, **kwargs)[0]
        kind = PREDICTION_KINDS[self.prediction_type]
        if kind == "v":
            return out.to(z.dtype)
        # conversion in float64; the angle kept off the singular ends (module doc)
        phi_c = phi.clamp(CONVERSION_DELTA, math.pi / 2 - CONVERSION_DELTA)
        v = to_v(out.double(), z.double(), kind, torch.cos(phi_c), torch.sin(phi_c))
        return v.to(z.dtype)

    def with_prediction_type(self, prediction_type: str) -> DiffusersTeacher:
        """A deep copy whose UNet output is read as `prediction_type` (e.g. "v_prediction").

        For a student that should be exported as a v-prediction model while the teacher
        predicts ε: pass `student=teacher.with_prediction_type("v_prediction")` to a fastdiff
        distillation method. The copy starts from the teacher's weights but not from its
        function (the output head must re-learn), so it needs more updates than a plain copy.
        """
        import copy

        other = copy.deepcopy(self)
        other.prediction_type = _prediction_name(prediction_type, "with_prediction_type")
        return other


def from_diffusers(unet, scheduler_or_config, *, prediction_type: str | None = None,
                   null_class: int | None = None, encoder_hidden_states=None,
                   source=None) -> DiffusersTeacher:
    """Wrap a diffusers UNet + its scheduler as a fastdiff teacher (see the module doc).

    unet: `UNet2DModel` or `UNet2DConditionModel`; scheduler_or_config: a discrete scheduler
    (DDPMScheduler, DDIMScheduler, …, anything with `alphas_cumprod`) or its config dict;
    prediction_type: "epsilon", "sample" or "v_prediction" (default: the scheduler's);
    null_class: the class-embedding row that means "no label" (y = −1); encoder_hidden_states:
    a fixed text embedding (L, D) or (1, L, D) for a UNet2DConditionModel, used when a call
    passes none; source: the pipeline folder (its vae/, text_encoder/, tokenizer/ are copied
    by `export_pipeline`).
    """
    _diffusers()
    if not isinstance(unet, nn.Module) or type(unet).__name__ not in UNET_CLASSES:
        raise TypeError(f"from_diffusers: unet must be one of {UNET_CLASSES}, "
                        f"got {type(unet).__name__}")
    ac, final, config = _scheduler_and_config(scheduler_or_config, "from_diffusers")
    prediction_type = prediction_type or config.get("prediction_type", "epsilon")
    prediction_type = _prediction_name(prediction_type, "from_diffusers")
    config["prediction_type"] = prediction_type
    return DiffusersTeacher(unet, DiffusersSchedule(ac, final), prediction_type=prediction_type,
                            null_class=null_class, encoder_hidden_states=encoder_hidden_states,
                            scheduler_config=config, source=source)


def _build_model(*, unet_class: str, unet_config: dict, scheduler_config: dict,
                 prediction_type: str, null_class=None, source=None,
                 encoder_hidden_states_shape=None) -> DiffusersTeacher:
    """Rebuild a DiffusersTeacher from its `.config` (weights are loaded afterwards)."""
    diffusers = _diffusers()
    if unet_class not in UNET_CLASSES:
        raise ValueError(f"unet_class must be one of {UNET_CLASSES}, got {unet_class!r}")
    unet = getattr(diffusers, unet_class).from_config(unet_config)
    ac, final, config = _scheduler_and_config(scheduler_config, "the diffusers model config")
    ehs = None if encoder_hidden_states_shape is None else \
        torch.zeros(encoder_hidden_states_shape)
    return DiffusersTeacher(unet, DiffusersSchedule(ac, final), prediction_type=prediction_type,
                            null_class=null_class, encoder_hidden_states=ehs,
                            scheduler_config=config, source=source)


register_model_kind(MODEL_KIND, _build_model)
register_schedule(DiffusersSchedule.name, DiffusersSchedule)


def _shield_kernels_name() -> None:
    """Keep transformers from importing fastdiff's kernels a second time.

    transformers probes for Hugging Face's `kernels` package by importing the top-level name
    `kernels` when it finds no installed metadata for it. Run from a fastdiff source
    checkout (the repository root on sys.path, as `python -m pytest` puts it), that name is
    fastdiff's own kernel folder: importing it again under a second name registers every
    `fastdiff::` custom op twice, and the next kernel call fails deep in the dispatcher
    ("ValueError: vector::reserve"). Only when the name resolves to that very folder, it is
    pointed at the module already imported as `fastdiff.kernels`; an installed `kernels`
    package is left alone.
    """
    import importlib.util
    import sys

    import fastdiff.kernels as ours

    if "kernels" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    if spec is not None and spec.origin and \
            Path(spec.origin).resolve() == Path(ours.__file__).resolve():
        sys.modules["kernels"] = ours


_shield_kernels_name()


# --- export ----------------------------------------------------------------------------------


def export_scheduler(student: DiffusersTeacher):
    """The DDIMScheduler that reproduces `student`'s schedule exactly (trailing spacing)."""
    diffusers = _diffusers()
    sched = student.schedule
    base = {k: v for k, v in student.scheduler_config.items()
            if k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                     "trained_betas", "rescale_betas_zero_snr")}
    base.update(num_train_timesteps=sched.T, prediction_type=student.prediction_type,
                timestep_spacing="trailing", steps_offset=0, clip_sample=False,
                thresholding=False, set_alpha_to_one=sched.final_alpha_cumprod == 1.0)

    def exact(s):
        return (torch.equal(s.alphas_cumprod.double(), sched.alphas_cumprod)
                and float(s.final_alpha_cumprod) == sched.final_alpha_cumprod)

    try:
        scheduler = diffusers.DDIMScheduler(**base)
    except Exception:  # e.g. a beta_schedule only DDPMScheduler knows
        scheduler = None
    if scheduler is None or not exact(scheduler):
        # the betas whose float32 cumulative product is the table
        ac = sched.alphas_cumprod
        betas = 1 - ac / torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
        base.update(trained_betas=betas.tolist(), beta_schedule="linear",
                    rescale_betas_zero_snr=False)
        scheduler = diffusers.DDIMScheduler(**base)
        err = (scheduler.alphas_cumprod.double() - sched.alphas_cumprod).abs().max()
        if float(err) > 1e-6 or float(scheduler.final_alpha_cumprod) != \
                sched.final_alpha_cumprod:
            raise ValueError(f"export_diffusers: cannot express this schedule as a "
                             f"DDIMScheduler (alphas_cumprod off by {float(err):.2g})")
    return scheduler


def export_diffusers(student, folder, *, steps: int, overwrite: bool = False) -> Path:
    """Save `student` as a diffusers DDIMPipeline folder; returns the folder.

    Layout (written to a temporary sibling, then renamed into place)::

        folder/model_index.json                         DDIMPipeline
        folder/unet/{config.json, diffusion_pytorch_model.safetensors}
        folder/scheduler/scheduler_config.json          DDIMScheduler, trailing spacing
        folder/fastdiff.json                            steps, null_class, prediction_type

    The scheduler has `prediction_type` = what the student's UNet outputs ("v_prediction"
    for a v-parameterised student), `timestep_spacing="trailing"`, `clip_sample=False` and
    the student's ᾱ table, so `DDIMPipeline.from_pretrained(folder)(num_inference_steps=
    steps)` (eta = 0) takes the same steps as `fastdiff.sample(student, noise, steps)`.
    steps: the student's step count; must divide the number of training timesteps T.
    An existing `folder` is replaced only with `overwrite=True` (and only if it is a folder
    this function wrote).
    """
    diffusers = _diffusers()
    from fastdiff.training import _unwrap

    student = _unwrap(student)
    if not isinstance(student, DiffusersTeacher):
        raise TypeError(f"export_diffusers: student must be a DiffusersTeacher (from "
                        f"from_diffusers or a distillation of one), got {type(student).__name__}")
    T = student.schedule.T
    if not isinstance(steps, int) or steps < 1 or T % steps:
        raise ValueError(f"export_diffusers: steps must be a positive divisor of the "
                         f"{T} training timesteps (DDIM's trailing grid is exact only then), "
                         f"got {steps!r}")
    target = Path(folder)
    if target.exists():
        ours = (target / FASTDIFF_JSON).is_file() or (target.is_dir() and
                                                      not any(target.iterdir()))
        if not overwrite or not ours:
            raise DiffusersFolderError(f"export_diffusers: {target} exists; pass overwrite=True "
                                       f"to replace a folder written by export_diffusers")
    scheduler = export_scheduler(student)
    pipe = diffusers.DDIMPipeline(unet=student.unet, scheduler=scheduler)
    meta = {"format": FORMAT, "version": 1, "steps": steps,
            "prediction_type": student.prediction_type, "null_class": student.null_class,
            "num_train_timesteps": T}

    def fill(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / FASTDIFF_JSON).write_text(json.dumps(meta, indent=2))

    return atomic_dir(target, fill)


PIPELINE_PARTS = ("vae", "text_encoder", "tokenizer")   # copied from the teacher's folder


def check_ddim_grid(steps: int, *, times=None, afs: bool = False, sampler: str = "ddim",
                    where: str = "export") -> None:
    """Raise ValueError unless a student sampled by `sampler` on `times` (t_0 = 1 > … > 0,
    float, len steps + 1; None: the uniform grid) with/without an analytical first step is
    what DDIM with trailing spacing runs: deterministic DDIM steps on t_i = 1 − i/N."""
    if sampler != "ddim":
        raise ValueError(f"{where}: this student samples with the {sampler!r} sampler, which a "
                         "DDIMScheduler cannot run (it renoises between steps); export the "
                         "deterministic stage-2 student instead")
    if afs:
        raise ValueError(f"{where}: this SFD student takes an analytical first step (AFS), "
                         "which a DDIMScheduler cannot express; distil without --afs to export")
    if times is not None:
        grid = torch.as_tensor(times, dtype=torch.float64).flatten()
        uniform = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        if grid.shape != uniform.shape or float((grid - uniform).abs().max()) > 1e-6:
            shown = ", ".join(f"{float(t):.4g}" for t in grid[:6])
            shown += ", ..." if len(grid) > 6 else ""
            raise ValueError(f"{where}: the student's time grid ({shown}) is not DDIM's "
                             f"trailing grid t_i = 1 - i/{steps}; a DDIMScheduler "
                             "cannot reproduce it (distil SFD with a uniform grid to export)")


def export_pipeline(student, folder, *, steps: int, teacher_folder=None,
                    overwrite: bool = False, times=None, afs: bool = False,
                    sampler: str = "ddim") -> Path:
    """Write `student` as a folder that diffusers' stock pipeline loads; returns the folder.

    A UNet2DConditionModel student becomes a StableDiffusionPipeline folder::

        folder/model_index.json       StableDiffusionPipeline (no safety checker)
        folder/unet/                  the student (time_cond_proj_dim set when guided)
        folder/scheduler/             DDIMScheduler: trailing spacing, the student's
                                      prediction_type and ᾱ table (`export_scheduler`)
        folder/vae/, text_encoder/, tokenizer/   copied from the teacher's pipeline folder
                                      (`teacher_folder`, default `student.source`) when there
        folder/fastdiff.json          steps, prediction_type, guided

    so `StableDiffusionPipeline.from_pretrained(folder)(prompt_embeds=e, latents=z,
    num_inference_steps=steps, guidance_scale=1 + w, output_type="latent")` makes one UNet
    pass per step (a guidance-distilled UNet takes w through its guidance embedding, so the
    pipeline does no classifier-free guidance) and returns
    `fastdiff.sample(student, z, steps, cond={"encoder_hidden_states": e, "w": w})`.
    A UNet2DModel student is written by `export_diffusers` (DDIMPipeline).
    steps: the student's step count (a divisor of T); times / afs / sampler: how the student
    samples (an SFD student's grid and analytical first step; "stochastic"): anything but
    DDIM on the uniform grid raises ValueError (`check_ddim_grid`).
    """
    diffusers = _diffusers()
    from fastdiff.training import _unwrap

    student = _unwrap(student)
    if not isinstance(student, DiffusersTeacher):
        raise TypeError(f"export: the model must be a diffusers student (a DiffusersTeacher or "
                        f"a distillation of one), got {type(student).__name__}")
    check_ddim_grid(steps, times=times, afs=afs, sampler=sampler)
    if not student.is_conditional_unet:
        return export_diffusers(student, folder, steps=steps, overwrite=overwrite)
    T = student.schedule.T
    if not isinstance(steps, int) or steps < 1 or T % steps:
        raise ValueError(f"export: steps must be a positive divisor of the {T} training "
                         f"timesteps (DDIM's trailing grid is exact only then), got {steps!r}")
    target = Path(folder)
    if target.exists():
        ours = (target / FASTDIFF_JSON).is_file() or (target.is_dir() and
                                                      not any(target.iterdir()))
        if not overwrite or not ours:
            raise DiffusersFolderError(f"export: {target} exists; pass overwrite=True "
                                       f"(--overwrite) to replace a folder fastdiff exported")
    source = teacher_folder if teacher_folder is not None else student.source
    source = Path(source) if source is not None else None
    if teacher_folder is not None and not Path(teacher_folder).is_dir():
        raise DiffusersFolderError(f"{teacher_folder}: no such folder (the teacher pipeline)")
    index = {}
    if source is not None and (source / "model_index.json").is_file():
        index = _read_json(source / "model_index.json", "the teacher's pipeline index")
    parts = [name for name in PIPELINE_PARTS
             if source is not None and (source / name).is_dir()]
    scheduler = export_scheduler(student)
    doc = {"_class_name": "StableDiffusionPipeline",
           "_diffusers_version": diffusers.__version__,
           "unet": ["diffusers", "UNet2DConditionModel"],
           "scheduler": ["diffusers", "DDIMScheduler"],
           "safety_checker": [None, None], "feature_extractor": [None, None],
           "image_encoder": [None, None], "requires_safety_checker": False}
    defaults = {"vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"]}
    for name in PIPELINE_PARTS:
        doc[name] = index.get(name, defaults[name]) if name in parts else [None, None]
    meta = {"format": FORMAT, "version": 1, "steps": steps,
            "prediction_type": student.prediction_type, "null_class": student.null_class,
            "num_train_timesteps": T, "guided": student.guidance_dim is not None,
            "copied": parts}

    def fill(tmp: Path) -> None:
        import shutil

        student.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        for name in parts:
            shutil.copytree(source / name, tmp / name)
        (tmp / "model_index.json").write_text(json.dumps(doc, indent=2))
        (tmp / FASTDIFF_JSON).write_text(json.dumps(meta, indent=2))

    return atomic_dir(target, fill)


# --- building the data: latents and prompt embeddings ----------------------------------------


def _pipeline_part(root: Path, name: str, what: str):
    """Load `root/name` with the class model_index.json names (diffusers or transformers)."""
    index = _read_json(root / "model_index.json", "the pipeline index")
    entry = index.get(name)
    if not (root / name).is_dir() or not isinstance(entry, list) or entry[0] is None:
        raise DiffusersFolderError(f"{root / name}: missing ({what}; `fastdiff encode` needs "
                                   "the pipeline's vae/, text_encoder/ and tokenizer/)")
    library, cls_name = entry
    try:
        module = __import__(library)
        cls = getattr(module, cls_name)
        return cls.from_pretrained(str(root / name))
    except ImportError as e:
        raise ImportError(f"{root / name} needs the {library} package ({e})") from e
    except Exception as e:  # from_pretrained raises many kinds on a broken folder
        raise DiffusersFolderError(f"{root / name}: cannot load {cls_name} ({e})") from e


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], *, batch_size: int = 32):
    """Prompt embeddings as StableDiffusionPipeline computes them: the text encoder's last
    hidden state over `tokenizer.model_max_length` padded tokens. float32 (N, L, D)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i:i + batch_size], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        out.append(text_encoder(ids)[0].float())
    return torch.cat(out)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, *, batch_size: int = 16) -> torch.Tensor:
    """Latents of images float (N, 3, H, W) in [−1, 1]: the VAE posterior's mean,
    (mean − shift_factor) × scaling_factor, as diffusers' training scripts feed the UNet.
    float32 (N, C, H/f, W/f)."""
    scale = float(vae.config.get("scaling_factor", 1.0) or 1.0)
    shift = float(vae.config.get("shift_factor", 0.0) or 0.0)
    out = []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images[i:i + batch_size].to(vae.dtype)).latent_dist
        out.append(((dist.mean - shift) * scale).float())
    return torch.cat(out)


def encode_folder(pipeline_folder, image_folder, out, *, negative_prompt: str = "",
                  batch_size: int = 16) -> Path:
    """Build the `.npz` that `--data` takes for a text-conditional teacher; returns `out`.

    image_folder: image files (all one size, the pipeline's image size), each with a caption
    in a text file of the same stem (`cat.png` + `cat.txt`). Writes `latents` float32
    (N, C, H, W) (`encode_latents`: × the VAE's scaling_factor), `prompt_embeds` float32
    (N, L, D) (`encode_prompts`) and `negative_prompt_embeds` (L, D), the embedding of
    `negative_prompt` (the empty prompt by default): classifier-free guidance's null.
    """
    import numpy as np

    from fastdiff.engine.checkpoint import atomic_write
    from fastdiff.engine.data import DataError, _image_files, _read_image_folder

    root, images_dir = Path(pipeline_folder), Path(image_folder)
    if not (root / "model_index.json").is_file():
        raise DiffusersFolderError(f"{root}: not a diffusers pipeline folder (no "
                                   "model_index.json)")
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: no such folder (the images to encode)")
    files = _image_files(images_dir)
    missing = [f.name for f in files if not f.with_suffix(".txt").is_file()]
    if missing:
        raise DataError(f"{images_dir}: {len(missing)} image(s) without a caption file of the "
                        f"same name (e.g. {missing[0]} needs {Path(missing[0]).stem}.txt)")
    x, _, _ = _read_image_folder(images_dir)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    captions = [f.with_suffix(".txt").read_text().strip() for f in files]
    vae = _pipeline_part(root, "vae", "the VAE")
    text_encoder = _pipeline_part(root, "text_encoder", "the text encoder")
    tokenizer = _pipeline_part(root, "tokenizer", "the tokenizer")
    latents = encode_latents(vae.eval(), x, batch_size=batch_size)
    embeds = encode_prompts(text_encoder.eval(), tokenizer, captions, batch_size=batch_size)
    negative = encode_prompts(text_encoder, tokenizer, [negative_prompt])[0]
    arrays = {"latents": latents.numpy(), "prompt_embeds": embeds.numpy(),
              "negative_prompt_embeds": negative.numpy()}
    out = Path(out)
    if out.suffix != ".npz":
        raise DataError(f"{out}: the output must be a .npz file")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(out, write)


# --- loading ---------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise DiffusersFolderError(f"{path}: missing ({what})")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DiffusersFolderError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise DiffusersFolderError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _load_unet(folder: Path):
    """Build the UNet from folder/config.json and load the safetensors weights strictly."""
    diffusers = _diffusers()
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = _read_json(folder / "config.json", "the UNet config")
    name = config.get("_class_name")
    if name not in UNET_CLASSES:
        raise DiffusersFolderError(f"{folder / 'config.json'}: _class_name is {name!r}, "
                                   f"expected one of {UNET_CLASSES}")
    weights = folder / WEIGHTS
    if not weights.is_file():
        extra = " (only pickle .bin weights found: re-save with safe_serialization=True)" \
            if (folder / "diffusion_pytorch_model.bin").exists() else ""
        raise DiffusersFolderError(f"{weights}: missing (the UNet weights){extra}")
    try:
        unet = getattr(diffusers, name).from_config(config)
    except Exception as e:
        raise DiffusersFolderError(f"{folder / 'config.json'}: cannot build {name}: {e}") from e
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise DiffusersFolderError(f"{weights}: unreadable safetensors file ({e})") from e
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with the wrong shape (e.g. {k}: file "
                         f"{tuple(state[k].shape)}, config {tuple(expected[k].shape)})")
        raise DiffusersFolderError(f"{weights}: weights do not fit {folder / 'config.json'}: "
                                   + "; ".join(parts))
    unet.load_state_dict(state, strict=True)
    return unet.eval()


def load_diffusers_teacher(folder, scheduler_folder=None, *, prediction_type: str | None = None,
                           null_class: int | None = None,
                           encoder_hidden_states=None) -> DiffusersTeacher:
    """Load a local diffusers folder as a fastdiff teacher (no downloads).

    folder: a pipeline folder (model_index.json with `unet/` and `scheduler/`; `vae/`,
    `text_encoder/`, `tokenizer/` optional and not loaded here; e.g. a Stable Diffusion
    folder, or one from `export_diffusers` / `pipeline.save_pretrained`), recorded as the
    teacher's `source`; or a UNet folder (config.json + diffusion_pytorch_model
    .safetensors), then with `scheduler_folder` (holding scheduler_config.json).
    prediction_type / null_class default to the scheduler config / fastdiff.json.
    Raises DiffusersFolderError (a ValueError) naming the path for a missing folder, config,
    weights or scheduler config, a config that is not a UNet2D(Condition)Model, or weights
    that do not fit the config.
    """
    _diffusers()
    root = Path(folder)
    if not root.is_dir():
        raise DiffusersFolderError(f"{root}: no such folder")
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    if scheduler_folder is not None:
        sched_dir = Path(scheduler_folder)
    elif (root / "scheduler").is_dir() or unet_dir != root:
        sched_dir = root / "scheduler"
    else:
        sched_dir = root
    if (root / "model_index.json").is_file():
        _read_json(root / "model_index.json", "the pipeline index")
        if unet_dir == root:
            raise DiffusersFolderError(f"{root}: pipeline folder without a unet/ subfolder")
        if scheduler_folder is None and not (root / "scheduler").is_dir():
            raise DiffusersFolderError(f"{root}: pipeline folder without a scheduler/ "
                                       "subfolder")
    meta = {}
    if (root / FASTDIFF_JSON).is_file():
        meta = _read_json(root / FASTDIFF_JSON, "fastdiff export metadata")
    sched_cfg = _read_json(sched_dir / "scheduler_config.json", "the scheduler config")
    unet = _load_unet(unet_dir)
    where = str(sched_dir / "scheduler_config.json")
    try:
        ac, final, config = _scheduler_and_config(sched_cfg, where)
    except ValueError as e:
        raise DiffusersFolderError(str(e)) from e
    if "prediction_type" in meta and meta["prediction_type"] != config.get("prediction_type"):
        raise DiffusersFolderError(f"{root / FASTDIFF_JSON}: prediction_type "
                                   f"{meta['prediction_type']!r} disagrees with {where} "
                                   f"({config.get('prediction_type')!r})")
    if "num_train_timesteps" in meta and meta["num_train_timesteps"] != ac.numel():
        raise DiffusersFolderError(f"{root / FASTDIFF_JSON}: num_train_timesteps "
                                   f"{meta['num_train_timesteps']} disagrees with {where} "
                                   f"({ac.numel()})")
    if null_class is None:
        null_class = meta.get("null_class")
    try:
        return from_diffusers(unet, {**config, "_class_name": config.get("_class_name")},
                              prediction_type=prediction_type, null_class=null_class,
                              encoder_hidden_states=encoder_hidden_states,
                              source=str(root.resolve()) if unet_dir != root else None)
    except ValueError as e:
        raise DiffusersFolderError(f"{root}: {e}") from e
