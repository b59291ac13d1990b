"""fastdiff.integrations.diffusers: a diffusers UNet as teacher, the student back as diffusers.

A tiny UNet2DModel (8×8, 1 channel) is trained briefly on digits with diffusers' own
DDPMScheduler (T = 1000, ε-prediction); then diffusers' DDIM loop and fastdiff's sampler must
agree, a short PD round's student must come back out of a DDIMPipeline folder unchanged, and
broken folders must be refused with a clear error.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from fastdiff.engine.samplers import sample  # noqa: E402
from fastdiff.integrations.diffusers import (  # noqa: E402
    DiffusersFolderError,
    DiffusersSchedule,
    DiffusersTeacher,
    export_diffusers,
    from_diffusers,
    load_diffusers_teacher,
)
from fastdiff.methods.pd import distill_round  # noqa: E402

T = 1000


def tiny_unet(**extra):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), **extra)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    from fastdiff.engine.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """(unet, DDPMScheduler) after 60 ε-prediction updates with diffusers' add_noise."""
    unet = tiny_unet()
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=T, prediction_type="epsilon")
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    x_all = digits.train
    first = last = None
    for _ in range(60):
        x = x_all[torch.randint(0, len(x_all), (32,), generator=gen)]
        eps = torch.randn(x.shape, generator=gen)
        k = torch.randint(0, T, (32,), generator=gen)
        loss = torch.nn.functional.mse_loss(unet(ddpm.add_noise(x, eps, k), k).sample, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < first  # it did learn something
    return unet.eval().requires_grad_(False), ddpm


def diffusers_ddim(unet, scheduler, noise, steps, **kw):
    """diffusers' own DDIM loop (eta = 0) from `noise`."""
    z = noise.clone()
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for k in scheduler.timesteps:
            z = scheduler.step(unet(z, k, **kw).sample, k, z).prev_sample
    return z, scheduler.timesteps


def noise_like(n=6, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# --- the schedule ----------------------------------------------------------------------------


def test_schedule_hits_nodes_and_interpolates_logsnr(trained):
    _, ddpm = trained
    s = DiffusersSchedule(ddpm.alphas_cumprod)
    ab = ddpm.alphas_cumprod.double()
    j = torch.arange(1, T + 1)
    # node j (t = j/T) is timestep k = j - 1, exactly
    phi = s.phi(j / T)
    assert torch.equal(phi, torch.atan2(torch.sqrt(1 - ab), torch.sqrt(ab)))
    assert torch.equal(s.timestep(j / T), (j - 1).double())
    # float32 t (what samplers pass to models) snaps to the same nodes
    assert torch.equal(s.timestep((j / T).float()), (j - 1).double())
    assert float(s.phi(0.0)) == 0.0 and float(s.phi(1.0)) == float(phi[-1])
    # between nodes: λ linear in k
    lam = torch.log(ab / (1 - ab))
    t_mid = (torch.arange(1, T, dtype=torch.float64) + 0.25) / T
    lam_mid = s.logsnr(t_mid)
    torch.testing.assert_close(lam_mid, 0.75 * lam[:-1] + 0.25 * lam[1:], rtol=1e-10, atol=1e-10)
    # first segment (ᾱ = 1 at t = 0): φ linear
    assert math.isclose(float(s.phi(0.5 / T)), 0.5 * float(phi[0]), rel_tol=1e-12)
    # monotone, and t_from_phi inverts phi
    t = torch.rand(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.cat([t, torch.tensor([0.0, 1.0, 0.3 / T, 1 - 0.3 / T])])
    p = s.phi(t)
    assert torch.all(torch.diff(s.phi(torch.linspace(0, 1, 5001, dtype=torch.float64))) > 0)
    # exact up to the documented snapping of t within 2^-22 of a node
    torch.testing.assert_close(s.t_from_phi(p), t, rtol=0, atol=2.0**-22)
    far = (t * T - torch.round(t * T)).abs() > 1e-3
    torch.testing.assert_close(s.t_from_phi(p)[far], t[far], rtol=0, atol=1e-10)


def test_schedule_rejects_bad_tables():
    with pytest.raises(ValueError, match="decreasing"):
        DiffusersSchedule([0.9, 0.95, 0.5])
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        DiffusersSchedule([0.9, 0.5], final_alpha_cumprod=0.8)


# --- (a) the same DDIM through diffusers and through fastdiff -----------------------------------


def source_scheduler(ddpm, source, prediction_type):
    """The scheduler (or config) handed to from_diffusers, and the DDIM that should match it."""
    cfg = dict(ddpm.config, prediction_type=prediction_type)
    ddim_kw = dict(timestep_spacing="trailing", clip_sample=False)
    if source == "ddpm":
        src = diffusers.DDPMScheduler.from_config(cfg)
    elif source == "config dict":  # rebuilt from its config
        src = {**cfg, "_class_name": "DDPMScheduler"}
    elif source == "ddim, set_alpha_to_one=False":  # the chain ends at ᾱ_0, not at ᾱ = 1
        ddim_kw["set_alpha_to_one"] = False
        src = diffusers.DDIMScheduler.from_config(cfg, **ddim_kw)
    elif source == "zero terminal SNR":  # ᾱ_{T-1} = 0: φ(1) = π/2 exactly
        ddim_kw["rescale_betas_zero_snr"] = True
        src = diffusers.DDPMScheduler.from_config(cfg, rescale_betas_zero_snr=True)
        assert float(src.alphas_cumprod[-1]) < 1e-6
    else:
        raise AssertionError(source)
    return src, diffusers.DDIMScheduler.from_config(cfg, **ddim_kw)


@pytest.mark.parametrize("source,prediction_type,steps", [
    ("ddpm", "epsilon", 10), ("ddpm", "epsilon", 25), ("ddpm", "sample", 10),
    ("ddpm", "v_prediction", 20), ("config dict", "epsilon", 10),
    ("ddim, set_alpha_to_one=False", "epsilon", 10), ("zero terminal SNR", "v_prediction", 10)])
def test_ddim_matches_diffusers_scheduler(trained, source, prediction_type, steps):
    unet, ddpm = trained
    # the same network read as each prediction type: both sides must interpret it alike
    src, ddim = source_scheduler(ddpm, source, prediction_type)
    teacher = from_diffusers(unet, src)
    assert teacher.prediction_type == prediction_type
    noise = noise_like()
    ref, timesteps = diffusers_ddim(unet, ddim, noise, steps)
    ours = sample(teacher, noise.clone(), steps, sampler="ddim")
    # fastdiff's grid t_i = 1 - i/N visits the scheduler's timesteps
    grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
    assert torch.equal(teacher.schedule.timestep(grid).long(), timesteps)
    scale = float(ref.abs().max())
    err = float((ours - ref).abs().max())
    print(f"ddim {source} {prediction_type} N={steps}: max |diff| {err:.3g} (max |x| {scale:.3g})")
    assert torch.isfinite(ours).all()
    assert err <= 2e-5 * max(scale, 1.0)


@pytest.mark.parametrize("source", ["ddpm", "ddim, set_alpha_to_one=False",
                                    "zero terminal SNR", "sigmoid betas"])
def test_export_scheduler_reproduces_the_schedule(trained, source):
    from fastdiff.integrations.diffusers import export_scheduler

    unet, ddpm = trained
    if source == "sigmoid betas":  # a DDPM-only beta schedule: exported as trained_betas
        src = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="sigmoid")
    else:
        src, _ = source_scheduler(ddpm, source, "v_prediction")
    teacher = from_diffusers(unet, src)
    out = export_scheduler(teacher)
    assert out.config.timestep_spacing == "trailing" and not out.config.clip_sample
    table = teacher.schedule.alphas_cumprod
    err = float((out.alphas_cumprod.double() - table).abs().max())
    assert err == 0.0 or (source == "sigmoid betas" and err < 1e-6)
    assert float(out.final_alpha_cumprod) == teacher.schedule.final_alpha_cumprod


def test_teacher_is_a_v_model(trained, digits):
    """At a node, v̂ from an ε-model is α ε̂ − σ x̂ with diffusers' own ᾱ."""
    unet, ddpm = trained
    teacher = from_diffusers(unet, ddpm)
    z = noise_like(4)
    k = 700
    ab = ddpm.alphas_cumprod[k].double()
    with torch.no_grad():
        eps = unet(z, torch.tensor(k)).sample.double()
        v = teacher(z, torch.full((4,), (k + 1) / T)).double()
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x_hat = (z.double() - s * eps) / a
    torch.testing.assert_close(v, a * eps - s * x_hat, rtol=1e-5, atol=1e-5)


# --- (b) PD on the wrapped teacher, then out through a DDIMPipeline folder -----------------------


@pytest.fixture(scope="module")
def distilled(trained, digits):
    """Short PD rounds 8 -> 4 steps: the plain copy (ε) and a v-parameterised student."""
    unet, ddpm = trained
    teacher = from_diffusers(unet, ddpm)
    out = {}
    for name, student in (("epsilon", None), ("v_prediction",
                                              teacher.with_prediction_type("v_prediction"))):
        result = distill_round(teacher, digits.train[:256], teacher_steps=8, updates=3,
                               batch_size=16, lr=1e-3, ema_decay=0.0, progress=False,
                               heldout_size=16, eval_every=3, student=student)
        assert result.steps == 4
        out[name] = result.student
    return teacher, out


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_exported_student_samples_the_same_in_diffusers(distilled, kind, tmp_path):
    teacher, students = distilled
    student = students[kind]
    assert isinstance(student, DiffusersTeacher) and student.prediction_type == kind
    noise = noise_like(4, seed=3)
    ours = sample(student, noise.clone(), 4)
    # the round changed the network: the comparison below could tell teacher from student
    assert float((ours - sample(teacher, noise.clone(), 4)).abs().max()) > 1e-3

    folder = export_diffusers(student, tmp_path / "student", steps=4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left
    pipe = diffusers.DDIMPipeline.from_pretrained(folder)
    cfg = pipe.scheduler.config
    assert cfg.prediction_type == kind and cfg.timestep_spacing == "trailing"
    assert not cfg.clip_sample
    assert json.loads((folder / "fastdiff.json").read_text())["steps"] == 4

    # the raw DDIM loop through the exported scheduler, before any post-processing
    ref, timesteps = diffusers_ddim(pipe.unet, pipe.scheduler, noise, 4)
    assert timesteps.tolist() == [999, 749, 499, 249]
    err = float((ours - ref).abs().max())
    # and the pipeline itself, with its own noise drawn from the same generator state
    images = pipe(batch_size=4, num_inference_steps=4, generator=torch.manual_seed(7),
                  output_type="np").images
    x = sample(student, torch.randn(4, 1, 8, 8, generator=torch.manual_seed(7)), 4)
    expect = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    err_np = float(abs(images - expect).max())
    print(f"export {kind}: raw loop max |diff| {err:.3g}, pipeline images {err_np:.3g}")
    assert err <= 2e-5 * max(float(ref.abs().max()), 1.0)
    assert err_np <= 2e-5

    # and back in as a teacher: the same model
    again = load_diffusers_teacher(folder)
    assert again.prediction_type == kind
    torch.testing.assert_close(sample(again, noise.clone(), 4), ours, rtol=0, atol=1e-6)


def test_export_refuses_bad_requests(distilled, tmp_path):
    teacher, students = distilled
    with pytest.raises(ValueError, match="divisor"):
        export_diffusers(students["epsilon"], tmp_path / "a", steps=3)
    with pytest.raises(TypeError, match="DiffusersTeacher"):
        export_diffusers(torch.nn.Linear(2, 2), tmp_path / "b", steps=4)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious.txt").write_text("keep")
    with pytest.raises(DiffusersFolderError, match="exists"):
        export_diffusers(teacher, tmp_path / "c", steps=4, overwrite=True)
    assert (tmp_path / "c" / "precious.txt").read_text() == "keep"
    export_diffusers(teacher, tmp_path / "d", steps=4)
    with pytest.raises(DiffusersFolderError, match="overwrite"):
        export_diffusers(teacher, tmp_path / "d", steps=4)
    export_diffusers(teacher, tmp_path / "d", steps=8, overwrite=True)
    assert json.loads((tmp_path / "d" / "fastdiff.json").read_text())["steps"] == 8


# --- (c) malformed or mismatched folders -------------------------------------------------------


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    unet, ddpm = trained
    return export_diffusers(from_diffusers(unet, ddpm), tmp_path_factory.mktemp("exp") / "good",
                            steps=10)


def _broken(exported, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(exported, folder)
    edit(folder)
    return folder


def _edit_json(path, **changes):
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


BROKEN = {
    "missing weights": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(),
                        "diffusion_pytorch_model.safetensors: missing"),
    "truncated weights": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors")
                          .write_bytes(b"\x10\x00"), "unreadable safetensors"),
    "config not JSON": (lambda f: (f / "unet" / "config.json").write_text("{oops"),
                        "config.json: not valid JSON"),
    "not a UNet": (lambda f: _edit_json(f / "unet" / "config.json", _class_name="VQModel"),
                   "_class_name is 'VQModel'"),
    "config does not fit weights": (
        lambda f: _edit_json(f / "unet" / "config.json", block_out_channels=[16, 48]),
        "weights do not fit"),
    "missing scheduler config": (lambda f: (f / "scheduler" / "scheduler_config.json").unlink(),
                                 "scheduler_config.json: missing"),
    "scheduler of another size": (
        lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", num_train_timesteps=500),
        "num_train_timesteps 1000 disagrees"),
    "scheduler config of a model": (
        lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", _class_name="UNet2DModel"),
        "'UNet2DModel' is not a diffusers scheduler"),
    "prediction types disagree": (
        lambda f: _edit_json(f / "scheduler" / "scheduler_config.json",
                             prediction_type="v_prediction"), "prediction_type 'epsilon'"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_folder_gives_clear_error(exported, tmp_path, case):
    edit, message = BROKEN[case]
    folder = _broken(exported, tmp_path, edit)
    with pytest.raises(DiffusersFolderError, match=message) as info:
        load_diffusers_teacher(folder)
    assert isinstance(info.value, ValueError)
    assert str(folder) in str(info.value)


def test_load_good_and_missing_folders(exported, tmp_path):
    load_diffusers_teacher(exported)  # the untouched copy loads
    # a bare UNet folder + a separate scheduler folder
    load_diffusers_teacher(exported / "unet", exported / "scheduler")
    with pytest.raises(DiffusersFolderError, match="no such folder"):
        load_diffusers_teacher(tmp_path / "nowhere")
    with pytest.raises(DiffusersFolderError, match="scheduler_config.json: missing"):
        load_diffusers_teacher(exported / "unet", tmp_path)


# --- conditioning and the optional dependency ----------------------------------------------------


def test_class_labels_with_a_null_row(trained):
    _, ddpm = trained
    unet = tiny_unet(num_class_embeds=11).eval()  # 10 classes + "no label" at 10
    teacher = from_diffusers(unet, ddpm, null_class=10)
    assert teacher.num_classes == 10
    z, t = noise_like(3), torch.full((3,), 0.5)
    with torch.no_grad():
        v_null = teacher(z, t, y=torch.full((3,), -1))
        torch.testing.assert_close(v_null, teacher(z, t, y=torch.full((3,), 10)))
        torch.testing.assert_close(v_null, teacher(z, t))
        assert float((teacher(z, t, y=torch.tensor([0, 1, 2])) - v_null).abs().max()) > 0
        guided = sample(teacher, z, 2, cond={"y": torch.tensor([0, 1, 2])}, guidance=1.0)
    assert torch.isfinite(guided).all()
    no_null = from_diffusers(unet, ddpm)
    with pytest.raises(ValueError, match="null_class"):
        no_null(z, t, y=torch.full((3,), -1))
    with pytest.raises(ValueError, match="last class-embedding row"):
        from_diffusers(unet, ddpm, null_class=3)


def test_import_fastdiff_without_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import fastdiff, fastdiff.integrations.diffusers as m\n"
        "try:\n"
        "    m.from_diffusers(None, None)\n"
        "except ImportError as e:\n"
        "    assert 'pip install fastdiff[diffusers]' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr


def test_labelled_pd_round_uses_the_null_row(trained, digits):
    """PD on (x, y) data: labels (with −1 dropout) reach the UNet's class embedding."""
    _, ddpm = trained
    unet = tiny_unet(num_class_embeds=11)
    teacher = from_diffusers(unet, ddpm, null_class=10)
    seen = []
    hook = unet.class_embedding.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    result = distill_round(teacher, (digits.train[:128], digits.train_labels[:128]),
                           teacher_steps=4, updates=2, batch_size=16, lr=1e-3,
                           label_dropout=0.5, progress=False, heldout_size=8, eval_every=2)
    hook.remove()
    labels = torch.cat(seen)
    assert labels.min() >= 0 and labels.max() == 10 and labels.lt(10).any()  # null row used
    x = sample(result.student, noise_like(2), 2, cond={"y": torch.tensor([3, 4])}, guidance=0.5)
    assert torch.isfinite(x).all()


def test_cross_attention_unet_with_a_fixed_prompt(trained):
    """UNet2DConditionModel + a fixed encoder_hidden_states: fastdiff = diffusers' DDIM."""
    _, ddpm = trained
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=8, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    prompt = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    teacher = from_diffusers(unet, ddpm, prediction_type="v_prediction",
                             encoder_hidden_states=prompt)
    ddim = diffusers.DDIMScheduler.from_config(ddpm.config, timestep_spacing="trailing",
                                               clip_sample=False, prediction_type="v_prediction")
    noise = noise_like(3)
    ref, _ = diffusers_ddim(unet, ddim, noise, 5, encoder_hidden_states=prompt.expand(3, 3, 8))
    ours = sample(teacher, noise.clone(), 5)
    assert float((ours - ref).abs().max()) <= 2e-5 * max(float(ref.abs().max()), 1.0)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        from_diffusers(unet, ddpm)(noise, torch.ones(3))


def test_sfd_distils_a_diffusers_teacher(trained):
    from fastdiff.methods.sfd import distill_sfd, sample_sfd

    unet, ddpm = trained
    result = distill_sfd(from_diffusers(unet, ddpm), student_steps=2, teacher_substeps=1,
                         data_shape=(1, 8, 8), updates=2, batch_size=4, progress=False)
    assert isinstance(result.student, DiffusersTeacher)
    assert torch.isfinite(sample_sfd(result, noise_like(2))).all()
