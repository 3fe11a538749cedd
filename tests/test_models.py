"""Model families and what the network predicts: epsilon, v and x0 models give the same DDIM
trajectories, and the project's DDIM sampling equals diffusers' own pipelines."""

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
