"""DDIM sampling back from an inversion: the source branch and the reconstruction it gives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .images import psnr
from .inversion.base import Inversion
from .model import DiffusionModel
from .schedule import ddim_step


def source_uncond(model: DiffusionModel, inversion: Inversion, i: int) -> Tensor:
    """The unconditional embedding the source branch uses at sampling step i: the method's
    per-step null embedding (null-text), the source prompt's (negative-prompt), else ''."""
    if inversion.uncond_embeddings is not None:
        return inversion.uncond_embeddings[i : i + 1]
    if inversion.source_as_uncond:
        return inversion.prompt_embedding
    return model.encode_prompt("")


@torch.no_grad()
def reconstruct_latent(model: DiffusionModel, inversion: Inversion, guidance_scale: float | None = None,
                       progress: bool = False) -> Tensor:
    """Sample z_0 back from z_T with the source prompt, using what the inversion prescribes
    (its guidance scale, null embeddings, source-branch offsets)."""
    schedule = inversion.schedule
    guidance = inversion.guidance_scale if guidance_scale is None else guidance_scale
    z = inversion.z_T.to(model.device)
    n = schedule.num_steps
    for i in tqdm(range(n), desc="reconstruct", disable=not progress, leave=False):
        k = n - i
        uncond = source_uncond(model, inversion, i) if guidance != 1.0 else None
        eps = model.eps(z, schedule.timesteps[k - 1], inversion.prompt_embedding, guidance, uncond)
        z = ddim_step(z, eps, schedule.abar(k), schedule.abar(k - 1))
        if inversion.source_offsets is not None:
            z = z + inversion.source_offsets[i : i + 1].to(z)
    return z


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
