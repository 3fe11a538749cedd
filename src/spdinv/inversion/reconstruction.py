"""Sampling an inversion back: the source branch as the inversion prescribes (its guidance
scale, per-step null embeddings or source-as-unconditional, its pin to the trajectory), and the
reconstruction, `spdinv.sampling.loop` with that one branch."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..images import psnr
from ..model import DiffusionModel
from ..sampling import Branch, loop
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


def reconstruction_error(model: DiffusionModel, inversion: Inversion, **kwargs) -> float:
    """Mean squared latent error between z_0 and its reconstruction from z_T (the paper's D_Rec)."""
    return float((reconstruct_latent(model, inversion, **kwargs) - inversion.z_0.to(model.device)).pow(2).mean())


@dataclass
class Reconstruction:
    """The image sampled back from z_T and how far it is from the input (image space, [0, 1])."""

    image: Tensor
    psnr: float
    mse: float


def reconstruct(model: DiffusionModel, inversion: Inversion, source: Tensor | None = None, **kwargs) -> Reconstruction:
    """Decode the reconstruction; compare with `source` (1, 3, H, W) in [-1, 1], else with decode(z_0)."""
    image = model.decode(reconstruct_latent(model, inversion, **kwargs))
    reference = model.decode(inversion.z_0) if source is None else source.to(image)
    mse = float(((image - reference) / 2).pow(2).mean())
    return Reconstruction(image=image, psnr=psnr(image, reference), mse=mse)
