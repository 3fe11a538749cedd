"""Model families and what the network predicts: epsilon, v and x0 models give the same DDIM
trajectories, and the project's DDIM sampling equals diffusers' own pipelines."""

import argparse
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline

from spdinv.inversion.ddim import DDIMOptions, ddim
from spdinv.model import DiffusionModel, from_pipeline
from spdinv.prediction import PREDICTION_TYPES
from spdinv.sampling import Branch, loop
from spdinv.testing import tiny_pipeline, tiny_scheduler

DATA_MEAN, DATA_STD = 0.3, 0.5


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser for data x0 ~ N(DATA_MEAN, DATA_STD^2 I), written in one parameterisation:
    E[x0 | z_t] = m + sqrt(abar) s^2 / (abar s^2 + 1 - abar) (z_t - sqrt(abar) m)."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        super().__init__()
        self.alphas_cumprod, self.prediction_type = alphas_cumprod.double(), prediction_type

    def forward(self, sample, timestep, encoder_hidden_states=None, **kwargs):
        z = sample.double()
        abar = self.alphas_cumprod[timestep].reshape(-1, 1, 1, 1)
        a, s = abar.sqrt(), (1 - abar).sqrt()
        x0 = DATA_MEAN + a * DATA_STD**2 / (abar * DATA_STD**2 + 1 - abar) * (z - a * DATA_MEAN)
        eps = (z - a * x0) / s
        output = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.prediction_type]
        return SimpleNamespace(sample=output.float())


def gaussian_model(prediction_type: str) -> DiffusionModel:
    scheduler = tiny_scheduler(prediction_type)
    unet = GaussianDenoiser(scheduler.alphas_cumprod, prediction_type)
    return DiffusionModel(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                          name=f"gaussian-{prediction_type}", device=torch.device("cpu"), dtype=torch.float32)


@pytest.mark.parametrize("steps", [5, 50])
def test_every_parameterisation_gives_the_same_trajectories(steps):
    """Sampling from noise and DDIM inversion agree across epsilon / v / x0 to float32 rounding
    (1e-4: the conversions divide by sqrt(1 - abar) >= 0.03). With 50 steps sampling lands on the
    data's spread (rms distance from the mean = its std, 0.5, to 5%; measured 0.492, and 0.347 at
    5 steps, where DDIM's discretisation contracts; a v output read as eps gave 4.84)."""
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    embedding = torch.zeros(1, 1, 1)
    samples, inversions = {}, {}
    for prediction_type in PREDICTION_TYPES:
        model = gaussian_model(prediction_type)
        schedule = model.schedule(steps)
        samples[prediction_type] = loop(model, schedule, noise, [Branch(embedding)])[:, 0]
        z0 = samples[prediction_type][-1:]
        inversions[prediction_type] = ddim(model, z0, embedding, schedule, DDIMOptions(), diagnose=False,
                                           progress=False).trajectory
    for prediction_type in ("v_prediction", "sample"):
        torch.testing.assert_close(samples[prediction_type], samples["epsilon"], atol=1e-4, rtol=0)
        torch.testing.assert_close(inversions[prediction_type], inversions["epsilon"], atol=1e-4, rtol=0)
    if steps == 50:
        spread = float((samples["v_prediction"][-1] - DATA_MEAN).pow(2).mean().sqrt())
        assert spread == pytest.approx(DATA_STD, rel=0.05)


def _diffusers_latents(pipe, prompt: str, latents: torch.Tensor, steps: int, guidance: float) -> list[torch.Tensor]:
    """The latents after every denoising step of a diffusers pipeline's own loop."""
    seen = []

    def record(pipeline, i, t, tensors):
        seen.append(tensors["latents"].clone())
        return {}

    pipe(prompt, latents=latents.clone(), num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
         callback_on_step_end=record)
    return seen


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_sampling_equals_stable_diffusion_pipeline(prediction_type):
    """Same batch layout ([uncond, cond]) and the same UNet calls: equal to 1e-5 (float32)."""
    pipe = tiny_pipeline(prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    model = from_pipeline(pipe, name=prediction_type)
    prompt, steps, guidance = "a red circle", 5, 7.5
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = _diffusers_latents(pipe, prompt, noise, steps, guidance)
    branch = Branch(model.encode_prompt(prompt), guidance, model.encode_prompt(""))
    ours = loop(model, model.schedule(steps), noise, [branch])
    assert len(expected) == steps
    for i, latent in enumerate(expected, start=1):
        torch.testing.assert_close(ours[i], latent, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheduler_class", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler"])
def test_inversion_schedule_ignores_the_shipped_sampler(scheduler_class):
    """Whatever sampler config a folder ships (Euler has no set_alpha_to_one, DPM-Solver saves
    linspace spacing), the inversion runs DDIM on the training betas with SD's settings."""
    import diffusers

    reference = from_pipeline(tiny_pipeline(), name="ddim").schedule(10)
    pipe = tiny_pipeline()
    pipe.scheduler = getattr(diffusers, scheduler_class).from_config(pipe.scheduler.config, timestep_spacing="linspace")
    schedule = from_pipeline(pipe, name=scheduler_class).schedule(10)
    assert schedule.timesteps == reference.timesteps == tuple(range(1, 1000, 100))
    assert float(schedule.abar(0)) == float(reference.abar(0)) < 1.0
    torch.testing.assert_close(schedule.alphas_cumprod, reference.alphas_cumprod, atol=0, rtol=0)


def test_cache_key_follows_the_model_files(tmp_path, red_circle):
    """A scheduler config swapped in place (here to v_prediction), or weights rewritten, change the
    inversion cache key; reloading the unchanged folder keeps it."""
    import json
    import os

    from PIL import Image

    from spdinv.editing.cache import InversionCache
    from spdinv.model import load_model

    folder = tmp_path / "model"
    tiny_pipeline().save_pretrained(folder)
    cache, image = InversionCache(tmp_path / "cache"), Image.open(red_circle)

    def key():
        return cache.key(load_model(folder), image, "a red circle", "ddim", 4, 0, DDIMOptions())

    first = key()
    assert key() == first
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"prediction_type": "v_prediction"}))
    swapped = key()
    assert swapped != first
    weights = next((folder / "unet").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert key() not in (first, swapped)


@pytest.mark.parametrize("class_name, family", [
    ("StableDiffusion3InpaintPipeline", "Stable Diffusion 3 inpainting"), ("FluxKontextPipeline", "FLUX.1 fill"),
    ("AuraFlowPipeline", "AuraFlow"),
    ("KandinskyV22Pipeline", "Kandinsky"), ("PixArtSigmaPipeline", "PixArt"), ("NoSuchPipeline", "NoSuchPipeline"),
])
def test_unsupported_families_are_refused_in_one_line(tmp_path, red_circle, capsys, class_name, family):
    import json

    from spdinv.cli import main

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name, "transformer": ["diffusers", "X"]}))
    code = main(["invert", str(red_circle), "--prompt", "a red circle", "--model", str(folder), "--out",
                 str(tmp_path / "out"), "--steps", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert family in err and "supported: Stable Diffusion 1.x/2.x" in err and "Stable Diffusion XL" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """The tiny pipeline as a diffusers folder and as one original-layout .safetensors checkpoint."""
    from original_layout import save_original_checkpoint

    root = tmp_path_factory.mktemp("single-file")
    pipe = tiny_pipeline()
    pipe.save_pretrained(root / "folder")
    save_original_checkpoint(pipe, root / "tiny.safetensors")
    return root


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_single_file_checkpoint_loads_offline_with_a_config_folder(single_file):
    from spdinv.model import load_model

    loaded = load_model(single_file / "tiny.safetensors", config=single_file / "folder")
    reference = load_model(single_file / "folder")
    for name in ("unet", "vae", "text_encoder"):
        assert _same_weights(getattr(loaded, name), getattr(reference, name)), name
    assert loaded.files and loaded.files != reference.files


def test_pickle_checkpoint_warns(single_file, tmp_path):
    from safetensors.torch import load_file

    from spdinv.loading import PickleCheckpointWarning
    from spdinv.model import load_model

    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(single_file / "tiny.safetensors")}, path)
    with pytest.warns(PickleCheckpointWarning, match="pickle"):
        loaded = load_model(path, config=single_file / "folder")
    assert _same_weights(loaded.unet, load_model(single_file / "folder").unet)


def _cli(args, capsys):
    from spdinv.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _only_notes(err: str) -> bool:
    """stderr holds spdinv's own notes (the image resize) and nothing from the libraries."""
    return all(line.startswith("note: ") for line in err.splitlines())


def test_cli_single_file(single_file, tmp_path, red_circle, capsys):
    """From the command line: without --config, one line saying what is missing; with it, it runs."""
    base = ["invert", red_circle, "--prompt", "a red circle", "--method", "ddim", "--steps", "2", "--quiet",
            "--model", single_file / "tiny.safetensors"]
    code, _, err = _cli([*base, "--out", tmp_path / "a"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--config" in err
    assert "Stable Diffusion 1.x/2.x checkpoint" in err
    code, out, err = _cli([*base, "--out", tmp_path / "b", "--config", single_file / "folder"], capsys)
    assert code == 0 and "noise error" in out and _only_notes(err)


def test_fp16_variant_folder(tmp_path, red_circle, capsys):
    """A folder with fp16-variant weights only: refused with a hint, loaded with --variant fp16 in
    the dtype asked, and nothing from the libraries on the terminal."""
    from spdinv.errors import SpdinvError
    from spdinv.model import load_model

    folder = tmp_path / "fp16"
    tiny_pipeline().to(torch.float16).save_pretrained(folder, variant="fp16")
    with pytest.raises(SpdinvError, match="--variant fp16"):
        load_model(folder)
    assert load_model(folder, variant="fp16", dtype="float16").unet.dtype == torch.float16
    assert load_model(folder, variant="fp16", dtype="bfloat16").unet.dtype == torch.bfloat16
    code, out, err = _cli(["invert", red_circle, "--prompt", "a red circle", "--method", "ddim", "--steps", "2",
                           "--quiet", "--model", folder, "--variant", "fp16", "--dtype", "bfloat16",
                           "--out", tmp_path / "out"], capsys)
    assert code == 0 and _only_notes(err)


def test_single_file_cache_key_follows_the_config_folder(single_file, tmp_path, red_circle):
    """A single file's scheduler config lives in --config: changing it there changes the key."""
    import json
    import shutil

    from PIL import Image

    from spdinv.editing.cache import InversionCache
    from spdinv.model import load_model

    config = tmp_path / "config"
    shutil.copytree(single_file / "folder", config)
    cache, image = InversionCache(tmp_path / "cache"), Image.open(red_circle)

    def key():
        return cache.key(load_model(single_file / "tiny.safetensors", config=config), image, "a red circle",
                         "ddim", 4, 0, DDIMOptions())

    first = key()
    scheduler = config / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps(json.loads(scheduler.read_text()) | {"prediction_type": "v_prediction"}))
    assert key() != first


def test_variant_and_config_where_they_do_not_apply(single_file):
    from spdinv.errors import SpdinvError
    from spdinv.model import load_model

    with pytest.raises(SpdinvError, match="--variant applies to diffusers folders"):
        load_model(single_file / "tiny.safetensors", variant="fp16", config=single_file / "folder")
    with pytest.raises(SpdinvError, match="--config applies to single-file checkpoints"):
        load_model(single_file / "folder", config=single_file / "folder")


def test_cache_key_checks_the_steps_first(tiny, tmp_path, red_circle):
    """The key needs the schedule; bad steps are a one-line error there too, not a traceback."""
    from PIL import Image

    from spdinv.editing.cache import InversionCache
    from spdinv.errors import SpdinvError

    for steps in (0, -1, 2.5):
        with pytest.raises(SpdinvError, match="steps must be a positive integer"):
            InversionCache(tmp_path).invert(tiny, Image.open(red_circle), "a red circle", "ddim", steps)


def test_dtype_auto_is_float16_on_cuda_and_float32_elsewhere():
    """--dtype auto (the default): float16 on CUDA, float32 on the CPU, where float16 has no fast
    kernels (benchmarks/dtype_speed.py); names and torch dtypes pass through, others are refused."""
    from spdinv.arguments import add_model_arguments
    from spdinv.errors import SpdinvError
    from spdinv.model import resolve_dtype

    assert resolve_dtype("auto", "cuda") == torch.float16 and resolve_dtype("auto", "cuda:1") == torch.float16
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(SpdinvError, match="unknown dtype"):
        resolve_dtype("float8", "cpu")
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    assert parser.parse_args([]).dtype == "auto"
    assert "float16" in parser.format_help() and "MEASURED" not in parser.format_help()


def test_decode_runs_the_vae_one_image_at_a_time(tiny, monkeypatch):
    """An edit decodes its source and target rows: one at a time, the VAE's full-resolution activations
    are one image's (SDXL-layout edit at 1024 px: peak 1.37x plain sampling's -> 1.18x; docs/results.md)."""
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batched = tiny.vae.decode(latents / tiny.latent_scale).sample.float().clamp(-1, 1)
    batches, original = [], tiny.vae.decode

    def counted(z, *args, **kwargs):
        batches.append(z.shape[0])
        return original(z, *args, **kwargs)

    monkeypatch.setattr(tiny.vae, "decode", counted)
    images = tiny.decode(latents)
    assert batches == [1, 1, 1]
    # the same images as one batched call, up to the convolutions' rounding for another batch size
    torch.testing.assert_close(images, batched, atol=1e-5, rtol=0)
