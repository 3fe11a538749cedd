"""Sampling an inversion back: the source branch as the inversion prescribes (its guidance
scale, per-step null embeddings or source-as-unconditional, its pin to the trajectory), and the
reconstruction, `spdinv.sampling.loop` with that one branch."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..images import psnr
from ..model import DiffusionModel
from ..sampling import Branch, batch_rows, loop
from .base import Inversion


def source_uncond(model: DiffusionModel, inversion: Inversion, i: int) -> Tensor:
    """The unconditional embedding the source branch uses at sampling step i: the method's
    per-step null embedding (null-text), the source prompt's (negative-prompt), else ''."""
    if inversion.uncond_embeddings is not None:
        return inversion.uncond_embeddings[i : i + 1]
    if inversion.source_as_uncond:
        return inversion.prompt_embedding
    return model.encode_prompt("")


def source_branch(model: DiffusionModel, inversion: Inversion, guidance_scale: float | None = None,
                  pin: bool = False) -> Branch:
    """The branch that samples the source image back as the inversion prescribes: its guidance
    scale, per-step null embeddings or source-as-unconditional, and the pin to the trajectory
    (DirectInversion, or `pin`)."""
    scale = inversion.guidance_scale if guidance_scale is None else guidance_scale
    if inversion.uncond_embeddings is not None:
        uncond = inversion.uncond_embeddings.to(model.device)
    else:
        uncond = source_uncond(model, inversion, 0).to(model.device)
    pinned = pin or inversion.pin_source
    return Branch(inversion.prompt_embedding.to(model.device), scale, uncond,
                  inversion.trajectory.to(model.device) if pinned else None)


def reconstruct_latent(model: DiffusionModel, inversion: Inversion, guidance_scale: float | None = None,
                       progress: bool = False) -> Tensor:
    """Sample z_0 back from z_T with the source prompt, using what the inversion prescribes
    (its guidance scale, null embeddings, pin): `loop` with one branch."""
    branch = source_branch(model, inversion, guidance_scale)
    return loop(model, inversion.schedule, inversion.z_T, [branch], progress=progress, desc="reconstruct",
                sampler=inversion.sampler)[-1]


def reconstruction_rows(model: DiffusionModel, inversion: Inversion, guidance_scale: float | None = None) -> int:
    """UNet rows one reconstruction evaluates: its batch's rows (1, or 2 with guidance) at every step."""
    return inversion.schedule.num_steps * len(batch_rows([source_branch(model, inversion, guidance_scale)]))


def reconstruction_error(model: DiffusionModel, inversion: Inversion, **kwargs) -> float:
    """Mean squared latent error between z_0 and its reconstruction from z_T (the paper's D_Rec)."""
    return float((reconstruct_latent(model, inversion, **kwargs) - inversion.z_0.to(model.device)).pow(2).mean())


def measure_reconstruction(model: DiffusionModel, inversion: Inversion) -> None:
    """Sample the reconstruction once and keep it on the inversion: its latent (for `reconstruct`
    to decode without sampling again), its latent error (D_Rec) and the UNet rows it cost."""
    latent = reconstruct_latent(model, inversion)
    inversion.reconstruction_latent = latent.detach()
    inversion.reconstruction_error = float((latent - inversion.z_0.to(model.device)).pow(2).mean())
    inversion.reconstruction_calls = reconstruction_rows(model, inversion)


PSNR_REFERENCE = "the input image, as conformed to the model's size"
DECODED_REFERENCE = "decode(z_0): the VAE's round trip of the input (its loss not counted)"


@dataclass
class Reconstruction:
    """The image sampled back from z_T and how far it is from `reference` (image space, [0, 1]):
    the input image whenever it is known (the CLI's and the benchmark's definition), else the
    VAE's decoding of z_0. `network_calls`: the UNet rows this call evaluated (0 when it reused the
    reconstruction `invert(diagnose=True)` sampled)."""

    image: Tensor
    psnr: float
    mse: float
    reference: str = PSNR_REFERENCE
    network_calls: int = 0


def reconstruct(model: DiffusionModel, inversion: Inversion, source: Tensor | None = None,
                guidance_scale: float | None = None, progress: bool = False) -> Reconstruction:
    """Decode the reconstruction (reusing the one the diagnostics sampled, if any) and compare it
    with `source` (1, 3, H, W) in [-1, 1], else with the image the inversion was computed from,
    else (an inversion loaded from disk) with decode(z_0); `reference` names which."""
    latent, calls = inversion.reconstruction_latent, 0
    if latent is None or guidance_scale is not None:
        latent = reconstruct_latent(model, inversion, guidance_scale, progress)
        calls = reconstruction_rows(model, inversion, guidance_scale)
    image = model.decode(latent.to(model.device))
    source = inversion.source if source is None else source
    reference, named = (model.decode(inversion.z_0), DECODED_REFERENCE) if source is None else (source, PSNR_REFERENCE)
    reference = reference.to(image)
    mse = float(((image - reference) / 2).pow(2).mean())
    return Reconstruction(image=image, psnr=psnr(image, reference), mse=mse, reference=named, network_calls=calls)
