"""Stable-Diffusion-style teachers: latent, text-conditional, guided, back into a stock pipeline.

Everything is built here from configs (nothing downloaded): a tiny UNet2DConditionModel
(4-channel 8×8 latents, cross-attention width 32), AutoencoderKL (16×16 RGB ↔ 4×8×8),
CLIPTextModel and a CLIPTokenizer over a 54-token vocabulary, saved as a
StableDiffusionPipeline folder. The checks: save/load round trips, the text teacher's DDIM
against diffusers' scheduler for every prediction type and scheduler config SD folders ship,
the data file and `fastdiff encode`, guided distillation through the CLI into a pipeline that
`StableDiffusionPipeline` runs with one UNet pass per step and the same latents as
`fastdiff.sample`, a crash-and-resume that ends bit-identical, and one clear error for each
bad folder and bad data file.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
import fastdiff  # noqa: E402  (before transformers: see integrations.diffusers._shield_kernels_name)

transformers = pytest.importorskip("transformers")
from fastdiff.apps.cli import main  # noqa: E402
from fastdiff.engine.checkpoint import load_config  # noqa: E402
from fastdiff.engine.data import DataError, load_dataset  # noqa: E402
from fastdiff.engine.samplers import sample  # noqa: E402
from fastdiff.integrations.diffusers import (  # noqa: E402
    DiffusersFolderError,
    DiffusersTeacher,
    check_ddim_grid,
    export_scheduler,
    guidance_embedding,
    load_diffusers_teacher,
)

pytestmark = pytest.mark.usefixtures("one_thread")

L, D = 16, 32          # prompt tokens, text width (= the UNet's cross_attention_dim)
SCHEDULERS = {
    "ddpm": lambda pred: diffusers.DDPMScheduler(num_train_timesteps=1000,
                                                 prediction_type=pred),
    # what SD 1.x folders ship: PNDM, scaled-linear betas, ᾱ_final = ᾱ_0
    "pndm": lambda pred: diffusers.PNDMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
        prediction_type=pred),
    "ddim": lambda pred: diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, clip_sample=False, set_alpha_to_one=False, prediction_type=pred),
    "euler": lambda pred: diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
        beta_end=0.012, prediction_type=pred),
}


def tiny_text_unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=D, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_tokenizer(folder):
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) for c in chars})
    vocab.update({c + "</w>": len(vocab) for c in chars})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                      model_max_length=L)


def make_pipeline(folder, *, scheduler="pndm", prediction_type="epsilon", parts=True):
    """A tiny StableDiffusionPipeline folder; returns the pipeline object."""
    torch.manual_seed(1)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
        latent_channels=4, norm_num_groups=8, sample_size=16)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=D, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=64, max_position_embeddings=L, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    tok = tiny_tokenizer(folder.parent / f"{folder.name}-tok")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=tiny_text_unet(),
        scheduler=SCHEDULERS[scheduler](prediction_type), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return pipe


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "pipe"
    make_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """12 latents with random prompt embeddings and a negative-prompt embedding."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("data") / "latents.npz"
    np.savez(path, latents=torch.randn(12, 4, 8, 8, generator=g).numpy(),
             prompt_embeds=torch.randn(12, L, D, generator=g).numpy(),
             negative_prompt_embeds=torch.randn(L, D, generator=g).numpy() * 0.1)
    return path


def embeds(n=3, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, L, D, generator=g)


def perturbed(model, seed=3, scale=0.02):
    """`model` with every floating parameter moved a little (a 'trained' copy)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# --- 1. save / load ---------------------------------------------------------------------------


def test_save_load_round_trips_teacher_and_guided_student(pipe_dir, tmp_path):
    teacher = load_diffusers_teacher(pipe_dir)
    assert teacher.source == str(pipe_dir.resolve()) and teacher.scalar_conds == ()
    z, e = embeds()
    t = torch.tensor([0.9, 0.5, 0.1])
    v = teacher(z, t, encoder_hidden_states=e)
    student = copy.deepcopy(teacher)
    fastdiff.add_scalar_condition(student, "w")   # the hook guided stage 1 calls
    assert student.scalar_conds == ("w",) and student.unet.config.time_cond_proj_dim == 256
    w = torch.tensor([0.0, 1.0, 4.0])
    assert torch.equal(student(z, t, encoder_hidden_states=e, w=w), v)  # starts as the teacher
    perturbed(student)
    v_s = student(z, t, encoder_hidden_states=e, w=w)
    assert not torch.allclose(v_s, student(z, t, encoder_hidden_states=e, w=w + 1))
    for model, ref, cond in ((teacher, v, {}), (student, v_s, {"w": w})):
        folder = fastdiff.save(model, tmp_path / f"m{len(cond)}")
        back = fastdiff.load(folder)
        assert isinstance(back, DiffusersTeacher) and back.scalar_conds == model.scalar_conds
        assert back.source == model.source and back.prediction_type == model.prediction_type
        assert torch.equal(back.schedule.alphas_cumprod, model.schedule.alphas_cumprod)
        assert torch.equal(back(z, t, encoder_hidden_states=e, **cond), ref)
        mine, theirs = model.state_dict(), back.state_dict()
        assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_guidance_embedding_is_the_pipelines():
    w = torch.tensor([0.0, 0.5, 2.0, 7.0])
    for dim in (256, 33):
        ref = diffusers.StableDiffusionPipeline.get_guidance_scale_embedding(
            None, w, embedding_dim=dim)
        assert torch.equal(guidance_embedding(w, dim), ref)


def test_w_needs_a_condition_unet():
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                                 block_out_channels=(16, 32), layers_per_block=1,
                                 norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    teacher = fastdiff.from_diffusers(unet, diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="only UNet2DConditionModel"):
        fastdiff.add_scalar_condition(teacher, "w")
    with pytest.raises(TypeError, match="no guidance embedding"):
        teacher(torch.zeros(1, 1, 8, 8), 0.5, w=1.0)


# --- 2. text-conditional teachers --------------------------------------------------------------


@pytest.mark.parametrize("scheduler,prediction_type", [
    ("pndm", "epsilon"), ("ddpm", "epsilon"), ("ddim", "v_prediction"), ("euler", "sample"),
    ("euler", "epsilon")])
def test_text_teacher_ddim_matches_diffusers(tmp_path, scheduler, prediction_type):
    folder = tmp_path / "pipe"
    make_pipeline(folder, scheduler=scheduler, prediction_type=prediction_type)
    teacher = load_diffusers_teacher(folder)
    assert teacher.prediction_type == prediction_type
    ddim = export_scheduler(teacher)
    z, e = embeds()
    steps = 4
    ours = sample(teacher, z.clone(), steps, cond={"encoder_hidden_states": e})
    ref = z.clone()
    ddim.set_timesteps(steps)
    with torch.no_grad():
        for k in ddim.timesteps:
            out = teacher.unet(ref, k, encoder_hidden_states=e).sample
            ref = ddim.step(out, k, ref).prev_sample
    err = float((ours - ref).abs().max())
    assert err <= 2e-5 * max(float(ref.abs().max()), 1.0), err


def test_text_teacher_rejects_wrong_embeddings(pipe_dir):
    teacher = load_diffusers_teacher(pipe_dir)
    z, e = embeds()
    with pytest.raises(ValueError, match="cross_attention_dim 32"):
        teacher(z, 0.5, encoder_hidden_states=e[..., :8])
    with pytest.raises(ValueError, match="needs encoder_hidden_states"):
        teacher(z, 0.5)


def test_bad_folders_give_one_clear_error(pipe_dir, tmp_path, capsys):
    import shutil

    cases = {}
    no_unet = tmp_path / "no_unet"
    shutil.copytree(pipe_dir, no_unet)
    shutil.rmtree(no_unet / "unet")
    cases[no_unet] = "without a unet/"
    no_sched = tmp_path / "no_sched"
    shutil.copytree(pipe_dir, no_sched)
    shutil.rmtree(no_sched / "scheduler")
    cases[no_sched] = "without a scheduler/"
    bad_index = tmp_path / "bad_index"
    shutil.copytree(pipe_dir, bad_index)
    (bad_index / "model_index.json").write_text("{not json")
    cases[bad_index] = "not valid JSON"
    bad_weights = tmp_path / "bad_weights"
    shutil.copytree(pipe_dir, bad_weights)
    (bad_weights / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    cases[bad_weights] = "unreadable safetensors"
    for folder, message in cases.items():
        with pytest.raises(DiffusersFolderError, match=message):
            load_diffusers_teacher(folder)
        rc = main(["distill", "--method", "guided", "--teacher", str(folder), "--data",
                   "digits", "--out", str(tmp_path / f"out-{folder.name}"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


# --- 3. data ------------------------------------------------------------------------------------


def test_latents_npz_is_a_conditioned_dataset(npz):
    ds = load_dataset(npz)
    raw = np.load(npz)
    assert ds.shape == (4, 8, 8) and ds.conditioned and ds.num_classes == 0
    e_tr, e_ho = ds.train_conds["encoder_hidden_states"], ds.held_out_conds[
        "encoder_hidden_states"]
    assert e_tr.shape == (len(ds.train), L, D) and e_ho.shape == (len(ds.held_out), L, D)
    # each example keeps its own prompt
    for x, e in zip(ds.train, e_tr):
        i = int(np.argmin(np.abs(raw["latents"] - x.numpy()).sum(axis=(1, 2, 3))))
        assert np.array_equal(raw["prompt_embeds"][i], e.numpy())
    assert np.array_equal(ds.null_conds["encoder_hidden_states"].numpy(),
                          raw["negative_prompt_embeds"])


def test_npz_without_negative_gets_zeros(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, latents=np.zeros((3, 4, 8, 8), np.float32),
             prompt_embeds=np.ones((3, L, D), np.float32))
    assert torch.equal(load_dataset(path).null_conds["encoder_hidden_states"],
                       torch.zeros(L, D))


@pytest.mark.parametrize("arrays,message", [
    ({"latents": (4, 4, 8, 8)}, "prompt_embeds missing"),
    ({"latents": (4, 4, 8, 8), "prompt_embeds": (3, L, D)}, "4 latents but 3 prompt_embeds"),
    ({"latents": (4, 8, 8), "prompt_embeds": (4, L, D)}, "latents has shape (4, 8, 8)"),
    ({"latents": (4, 4, 8, 8), "prompt_embeds": (4, L, D),
      "negative_prompt_embeds": (L, D + 1)}, "negative_prompt_embeds has shape"),
])
def test_mismatched_npz_gives_one_clear_error(tmp_path, capsys, pipe_dir, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: np.zeros(s, np.float32) for k, s in arrays.items()})
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(path)
    rc = main(["distill", "--method", "guided", "--teacher", str(pipe_dir), "--data",
               str(path), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


def test_data_that_does_not_fit_the_teacher(pipe_dir, tmp_path, capsys):
    path = tmp_path / "wide.npz"
    np.savez(path, latents=np.zeros((4, 4, 8, 8), np.float32),
             prompt_embeds=np.zeros((4, L, D + 8), np.float32))
    rc = main(["distill", "--method", "guided", "--teacher", str(pipe_dir), "--data",
               str(path), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cross_attention_dim is 32" in err, err


def test_encode_builds_the_npz_with_the_pipelines_own_encoders(pipe_dir, tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    g = np.random.default_rng(0)
    captions = ["a cat", "two dogs", "red", "the sea"]
    for i, c in enumerate(captions):
        Image.fromarray(g.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            images / f"im{i}.png")
        (images / f"im{i}.txt").write_text(c)
    out = tmp_path / "enc.npz"
    assert main(["encode", "--pipeline", str(pipe_dir), "--images", str(images), "--out",
                 str(out)]) == 0
    capsys.readouterr()
    got = np.load(out)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipe_dir)
    e, neg = pipe.encode_prompt(captions, "cpu", 1, True, [""] * 4)
    np.testing.assert_allclose(got["prompt_embeds"], e.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(got["negative_prompt_embeds"], neg[0].detach().numpy(),
                               atol=1e-6)
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(images / f"im{i}.png"))).permute(
        2, 0, 1).float() / 127.5 - 1 for i in range(4)])
    with torch.no_grad():
        lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    np.testing.assert_allclose(got["latents"], lat.numpy(), atol=1e-5)
    assert load_dataset(out).shape == (4, 8, 8)
    (images / "im0.txt").unlink()
    assert main(["encode", "--pipeline", str(pipe_dir), "--images", str(images), "--out",
                 str(out)]) == 2
    assert "without a caption file" in capsys.readouterr().err


# --- 4, 5. guided distillation through the CLI, into a stock pipeline -------------------------


def _pipeline_latents(folder, z, e, w, steps):
    """StableDiffusionPipeline's latents and how many UNet passes it made."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    out = pipe(prompt_embeds=e, latents=z.clone(), num_inference_steps=steps,
               guidance_scale=1.0 + w, output_type="latent", height=16, width=16)
    return out.images, len(calls), pipe


def test_guided_cli_distill_export_runs_in_stable_diffusion_pipeline(pipe_dir, npz, tmp_path,
                                                                     capsys):
    out = tmp_path / "run"
    cmd = ["distill", "--method", "guided", "--teacher", str(pipe_dir), "--data", str(npz),
           "--out", str(out), "--start-steps", "8", "--end-steps", "2", "--updates", "2",
           "--stage1-updates", "3", "--batch-size", "4", "--eval-every", "50",
           "--stochastic-steps", "2", "--gradient-checkpointing", "--quiet"]
    assert main(cmd) == 0, capsys.readouterr().err
    capsys.readouterr()
    student = fastdiff.load(out / "student")
    assert student.scalar_conds == ("w",) and not student.unet.is_gradient_checkpointing
    assert fastdiff.load(out / "stochastic").scalar_conds == ("w",)
    assert load_config(out / "stochastic")["metadata"]["updates"] == 2  # --updates
    # a rerun reuses what is finished and trains nothing
    assert main(cmd) == 0
    assert "reusing" in capsys.readouterr().out
    # ... and other stochastic settings retrain only the stochastic student, saying so
    assert main(cmd + ["--stochastic-updates", "3"]) == 0
    printed = capsys.readouterr().out
    assert "stochastic student: retraining" in printed and "stage 1: reusing" in printed
    assert load_config(out / "stochastic")["metadata"]["updates"] == 3
    pipe_out = tmp_path / "pipe-out"
    assert main(["export", "--model", str(out / "student"), "--out", str(pipe_out)]) == 0
    capsys.readouterr()
    for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        assert (pipe_out / name).is_dir()
    z, e = embeds(2, seed=9)
    results = {}
    for w in (0.0, 2.0):
        ref = sample(student, z.clone(), 2, cond={"encoder_hidden_states": e,
                                                  "w": torch.full((2,), w)})
        got, calls, pipe = _pipeline_latents(pipe_out, z, e, w, 2)
        assert calls == 2                                 # one UNet pass per step, no CFG
        assert pipe.scheduler.config.timestep_spacing == "trailing"
        assert pipe.scheduler.config.prediction_type == student.prediction_type
        assert float((got - ref).abs().max()) <= 1e-4
        results[w] = got
    assert not torch.allclose(results[0.0], results[2.0], atol=1e-6)  # w does reach the UNet
    # the stochastic-sampler student renoises: no DDIMScheduler runs it
    assert main(["export", "--model", str(out / "stochastic"), "--out",
                 str(tmp_path / "x")]) == 2
    assert "stochastic" in capsys.readouterr().err


def test_pd_cli_student_exports_too(pipe_dir, npz, tmp_path, capsys):
    out = tmp_path / "pd"
    assert main(["distill", "--method", "pd", "--teacher", str(pipe_dir), "--data", str(npz),
                 "--out", str(out), "--start-steps", "4", "--end-steps", "2", "--updates",
                 "2", "--batch-size", "4", "--quiet"]) == 0, capsys.readouterr().err
    pipe_out = tmp_path / "pipe-pd"
    assert main(["export", "--model", str(out / "student"), "--out", str(pipe_out)]) == 0
    student = fastdiff.load(out / "student")
    z, e = embeds(2, seed=4)
    ref = sample(student, z.clone(), 2, cond={"encoder_hidden_states": e})
    got, calls, _ = _pipeline_latents(pipe_out, z, e, 0.0, 2)
    assert calls == 2 and float((got - ref).abs().max()) <= 1e-4


def test_sfd_grid_ddim_cannot_express_is_refused():
    check_ddim_grid(4, times=[1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValueError, match="not DDIM's trailing grid"):
        check_ddim_grid(4, times=[1.0, 0.6, 0.3, 0.1, 0.0])
    with pytest.raises(ValueError, match="analytical first step"):
        check_ddim_grid(4, afs=True)


# --- 6, 7. memory options; crash and resume ---------------------------------------------------


def test_gradient_checkpointing_changes_memory_not_gradients(pipe_dir):
    from fastdiff.apps.distill import teacher_dtype

    teacher = load_diffusers_teacher(pipe_dir)
    plain = copy.deepcopy(teacher).train()
    ckpt = copy.deepcopy(teacher).enable_gradient_checkpointing()
    student = copy.deepcopy(ckpt).train()               # a method's copy inherits it
    assert student.unet.is_gradient_checkpointing and not teacher.unet.is_gradient_checkpointing
    z, e = embeds()
    grads = []
    for m in (plain, student):
        m.zero_grad()
        m(z, torch.tensor([0.9, 0.5, 0.2]), encoder_hidden_states=e).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)

    class Args:
        teacher_dtype = "auto"

    assert teacher_dtype(Args, "cpu") == "fp32"   # bf16 only on CUDA devices that have it


def _guided_stage1(teacher, ds, ckpt):
    return fastdiff.distill_guidance(teacher, ds, updates=4, batch_size=4, lr=1e-3,
                                     checkpoint_dir=ckpt, checkpoint_every=1, eval_every=100,
                                     heldout_size=2, eval_ws=(0.0, 2.0), progress=False,
                                     policy="off")   # its measurement would call the teacher


def test_crash_and_resume_on_a_diffusers_teacher_is_bit_identical(pipe_dir, npz, tmp_path,
                                                                  monkeypatch):
    ds = load_dataset(npz)
    ref = _guided_stage1(load_diffusers_teacher(pipe_dir), ds, tmp_path / "a").student
    teacher = load_diffusers_teacher(pipe_dir)
    forward, calls = DiffusersTeacher.forward, []

    def crashing(self, *a, **k):
        if self is teacher:      # the frozen teacher only, not the student copied from it
            calls.append(1)
            if len(calls) == 5:  # held-out pass + 3 updates done: dies inside update 4
                raise RuntimeError("simulated crash")
        return forward(self, *a, **k)

    monkeypatch.setattr(DiffusersTeacher, "forward", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _guided_stage1(teacher, ds, tmp_path / "b")
    monkeypatch.undo()
    assert (tmp_path / "b" / "stage1.state").exists()
    resumed = _guided_stage1(load_diffusers_teacher(pipe_dir), ds, tmp_path / "b")
    assert resumed.history.resumed_from == 3, resumed.history.resumed_from
    mine, theirs = ref.state_dict(), resumed.student.state_dict()
    assert set(mine) == set(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def _guided_cmd(pipe_dir, npz, out, *extra):
    return ["distill", "--method", "guided", "--teacher", str(pipe_dir), "--data", str(npz),
            "--out", str(out), "--start-steps", "4", "--end-steps", "1", "--updates", "3",
            "--stage1-updates", "3", "--batch-size", "4", "--eval-every", "50",
            "--checkpoint-every", "1", "--quiet", *extra]


def test_cli_killed_in_stage_2_resumes_bit_identical(pipe_dir, npz, tmp_path, monkeypatch,
                                                      capsys):
    assert main(_guided_cmd(pipe_dir, npz, tmp_path / "ref")) == 0
    forward = DiffusersTeacher.forward
    checkpoints = tmp_path / "run" / "checkpoints"

    def crashing(self, *a, **k):
        # stage 2, round 4 -> 2 writes its state after every update: the first teacher pass
        # once that state exists is inside its second update
        if (tmp_path / "run" / "stage1").is_dir() and not torch.is_grad_enabled() \
                and list(checkpoints.glob("round-*.state")):
            raise RuntimeError("simulated crash")
        return forward(self, *a, **k)

    monkeypatch.setattr(DiffusersTeacher, "forward", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(_guided_cmd(pipe_dir, npz, tmp_path / "run"))
    monkeypatch.undo()
    assert (tmp_path / "run" / "stage1").is_dir()
    assert list((tmp_path / "run" / "checkpoints").glob("round-*.state"))
    assert main(_guided_cmd(pipe_dir, npz, tmp_path / "run")) == 0
    assert "reusing" in capsys.readouterr().out
    ref, got = (fastdiff.load(tmp_path / d / "student").state_dict() for d in ("ref", "run"))
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_bf16_teacher_option(pipe_dir, npz, tmp_path, capsys):
    assert main(_guided_cmd(pipe_dir, npz, tmp_path / "bf16", "--teacher-dtype", "bf16",
                            "--end-steps", "2")) == 0, capsys.readouterr().err
    stage1 = fastdiff.load(tmp_path / "bf16" / "stage1")
    assert all(p.dtype == torch.float32 for p in stage1.parameters())   # the student: fp32
    from fastdiff.engine.checkpoint import load_config

    assert load_config(tmp_path / "bf16" / "stage1")["metadata"]["teacher_dtype"] == "bf16"
    rc = main(["distill", "--method", "pd", "--teacher", str(pipe_dir), "--data", str(npz),
               "--out", str(tmp_path / "pd"), "--teacher-dtype", "bf16", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--teacher-dtype bf16 is for --method guided" in err, err


def test_sfd_cli_on_prompt_embeddings_and_its_export_error(pipe_dir, npz, tmp_path, capsys):
    out = tmp_path / "sfd"
    assert main(["distill", "--method", "sfd", "--teacher", str(pipe_dir), "--data", str(npz),
                 "--out", str(out), "--student-steps", "2", "--teacher-substeps", "1",
                 "--updates", "4", "--batch-size", "2", "--quiet"]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    student = fastdiff.load(out / "student")
    assert isinstance(student, DiffusersTeacher)
    rc = main(["export", "--model", str(out / "student"), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not DDIM's trailing grid" in err, err


def test_guided_student_lists_parameters_as_a_loaded_one(pipe_dir, tmp_path):
    """Optimizer state is restored by parameter position: a student that gained w must
    list its parameters in the order of the same model rebuilt by fastdiff.load."""
    student = copy.deepcopy(load_diffusers_teacher(pipe_dir))
    fastdiff.add_scalar_condition(student, "w")
    back = fastdiff.load(fastdiff.save(student, tmp_path / "s"))
    assert [n for n, _ in student.named_parameters()] == \
        [n for n, _ in back.named_parameters()]


def test_progressive_distill_can_drop_used_teachers(pipe_dir, npz):
    """keep_students=False holds two rounds' models at a time, not every round's."""
    results = fastdiff.progressive_distill(
        load_diffusers_teacher(pipe_dir), load_dataset(npz), start_steps=4, end_steps=1,
        updates=1, batch_size=2, eval_every=100, heldout_size=2, progress=False,
        keep_students=False)
    assert [r.steps for r in results] == [2, 1]
    assert results[0].student is None and isinstance(results[1].student, DiffusersTeacher)


def test_transformers_does_not_import_fastdiffs_kernels_twice():
    """From the repository root, the top-level name `kernels` (which transformers imports
    when probing for Hugging Face's package) is fastdiff's kernel folder: it must be the
    module already imported, or every custom op is registered twice."""
    import sys

    import fastdiff.kernels

    assert sys.modules.get("kernels", fastdiff.kernels) is fastdiff.kernels
    assert not [m for m in sys.modules if m.startswith("kernels.")]


def test_fastdiff_sample_takes_a_text_conditional_diffusers_model(pipe_dir, npz, tmp_path,
                                                                   capsys):
    model = load_diffusers_teacher(pipe_dir)
    fastdiff.save(model, tmp_path / "m")
    out = tmp_path / "latents.npz"
    assert main(["sample", "--model", str(tmp_path / "m"), "--steps", "2", "--n", "3",
                 "--data", str(npz), "--out", str(out)]) == 0
    got = torch.from_numpy(np.load(out)["latents"])
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    e = torch.from_numpy(np.load(npz)["prompt_embeds"])[:3]
    want = sample(model, noise, 2, cond={"encoder_hidden_states": e})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert main(["sample", "--model", str(tmp_path / "m"), "--steps", "2", "--n", "3",
                 "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text-conditional: give --data" in err[0], err
